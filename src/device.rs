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
