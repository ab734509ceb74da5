//! `--device` parsing.
use anyhow::{bail, Result};
use tch::{Cuda, Device};

/// `cpu`, `cuda` (= `cuda:0`), `cuda:N`, or `auto` (CUDA when available).
pub fn parse(s: &str) -> Result<Device> {
    let d = match s {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => Device::Cuda(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device {s:?}: use cpu, cuda, cuda:N or auto"),
        },
    };
    if let Device::Cuda(i) = d {
        let n = Cuda::device_count() as usize;
        if !Cuda::is_available() || i >= n {
            bail!("device {s:?} requested but CUDA is not available here ({n} CUDA devices visible to libtorch)");
        }
    }
    Ok(d)
}

extern "C" {
    fn medgen_set_deterministic(err: *mut std::ffi::c_char, err_len: usize) -> i32;
    fn medgen_determinism_flags() -> i32;
}

/// `--deterministic`: seeded CUDA runs repeat themselves. cuDNN picks deterministic algorithms
/// and stops benchmarking (which may pick another algorithm per run), TF32 is off in cuDNN and
/// cuBLAS (fp32 stays fp32, as on the CPU), PyTorch's deterministic-algorithms mode is on in its
/// warn-only form (an op without a deterministic CUDA kernel warns instead of failing), and
/// `CUBLAS_WORKSPACE_CONFIG` is `:4096:8` unless already set. Call it before any tensor is made.
/// The CPU's kernels are deterministic already; their results do not change.
pub fn set_deterministic() -> Result<()> {
    let mut err = vec![0 as std::ffi::c_char; 1024];
    if unsafe { medgen_set_deterministic(err.as_mut_ptr(), err.len()) } != 0 {
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        bail!("cannot make this run deterministic: {msg}");
    }
    let d = Determinism::current()?;
    anyhow::ensure!(d.is_deterministic(), "libtorch did not keep the deterministic settings: {d:?}");
    Ok(())
}

/// libtorch's process-wide flags that decide whether CUDA runs repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Determinism {
    pub cudnn_deterministic: bool,
    pub cudnn_benchmark: bool,
    pub cudnn_tf32: bool,
    pub cublas_tf32: bool,
    pub deterministic_algorithms: bool,
    pub warn_only: bool,
}

impl Determinism {
    pub fn current() -> Result<Self> {
        let f = unsafe { medgen_determinism_flags() };
        if f < 0 {
            bail!("libtorch refused to report its cuDNN/TF32 flags");
        }
        let bit = |i: u32| f & (1 << i) != 0;
        Ok(Self {
            cudnn_deterministic: bit(0),
            cudnn_benchmark: bit(1),
            cudnn_tf32: bit(2),
            cublas_tf32: bit(3),
            deterministic_algorithms: bit(4),
            warn_only: bit(5),
        })
    }

    /// What [`set_deterministic`] sets.
    pub fn is_deterministic(&self) -> bool {
        self.cudnn_deterministic
            && !self.cudnn_benchmark
            && !self.cudnn_tf32
            && !self.cublas_tf32
            && self.deterministic_algorithms
            && self.warn_only
    }
}
