//! Fréchet Inception Distance and Kernel Inception Distance of two feature sets, in float64.
//!
//! FID is the reference's `FIDMetric` (monai-generative 0.2): means, covariances with 1/(N-1),
//! `|mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2)`. scipy's Schur-based `sqrtm` has no libtorch
//! counterpart; `tr sqrtm(S1 S2)` equals the sum of the square roots of the eigenvalues of the
//! symmetric `sqrt(S1) S2 sqrt(S1)`, computed here with `eigh` (negative round-off clamped to
//! 0). With more samples than dimensions the two agree to float64 rounding (4e-13 relative in the
//! parity test). With fewer (rank-deficient covariances, as the reference's 1000 samples of 2048-d
//! features) both are slightly off the exact value, in the same way: the round-off eigenvalues of
//! the null space contribute their square roots, so `tr sqrtm` comes out a little too large (FID
//! of a 1000x2048 set with itself: -3e-5 with scipy and here, instead of 0). The two agree to
//! ~1e-8 relative (parity test); the exact value (the nuclear norm of `Xc1 Xc2^T / sqrt((N1-1)(N2-1))`
//! from the centred features) is deliberately not used, as it would move away from the reference.
//!
//! KID is the unbiased squared MMD with the kernel `(x·y/d + 1)^3`, averaged over random subsets
//! as torchmetrics' `KernelInceptionDistance` draws them (`randperm` per subset, after seeding):
//! with the same seed, the same subsets as PyTorch.
//!
//! [`FeatureStats`] holds one side's statistics (and, optionally, its features for KID) in a
//! `.safetensors` file, so a fixed real set is run through the feature network once.
use crate::checkpoint::StateDict;
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Safetensors metadata key holding the sample count of a [`FeatureStats`] file.
pub const META_COUNT: &str = "medgen.fid.count";

fn check(a: &Tensor, b: &Tensor) -> Result<()> {
    let (sa, sb) = (a.size(), b.size());
    ensure!(sa.len() == 2 && sb.len() == 2, "features must be (samples, dims), got {sa:?} and {sb:?}");
    ensure!(sa[1] == sb[1], "feature widths differ: {sa:?} vs {sb:?}");
    ensure!(sa[0] >= 2 && sb[0] >= 2, "FID needs at least 2 samples per set, got {} and {}", sa[0], sb[0]);
    Ok(())
}

/// Mean and covariance (1/(N-1)) of `(N, d)` features, in float64.
pub fn statistics(features: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = features.to_kind(Kind::Double).to_device(Device::Cpu);
    let n = x.size()[0];
    ensure!(n >= 2, "statistics need at least 2 samples, got {n}");
    let mu = x.mean_dim(0, false, None);
    let c = &x - &mu;
    let sigma = c.transpose(0, 1).matmul(&c) / (n - 1) as f64;
    Ok((mu, sigma))
}

/// The symmetric square root of a symmetric positive semi-definite matrix.
fn sqrt_psd(m: &Tensor) -> Result<Tensor> {
    let (w, v) = m.f_linalg_eigh("L")?;
    let r = w.clamp_min(0.0).sqrt();
    Ok((&v * r.unsqueeze(0)).matmul(&v.transpose(0, 1)))
}

/// `tr sqrtm(S1 S2)` for covariances S1, S2.
fn trace_sqrt_product(s1: &Tensor, s2: &Tensor) -> Result<f64> {
    let r = sqrt_psd(s1)?;
    let m = r.matmul(s2).matmul(&r);
    let m = (&m + m.transpose(0, 1)) * 0.5;
    let w = m.f_linalg_eigvalsh("L")?;
    Ok(f64::try_from(w.clamp_min(0.0).sqrt().sum(Kind::Double))?)
}

/// FID from statistics.
pub fn frechet_distance(mu1: &Tensor, s1: &Tensor, mu2: &Tensor, s2: &Tensor) -> Result<f64> {
    let d = mu1.size()[0];
    ensure!(
        mu1.size() == [d] && mu2.size() == [d] && s1.size() == [d, d] && s2.size() == [d, d],
        "FID statistics disagree: means {:?} and {:?}, covariances {:?} and {:?}",
        mu1.size(),
        mu2.size(),
        s1.size(),
        s2.size()
    );
    let d = mu1 - mu2;
    let mean_term = f64::try_from(d.dot(&d))?;
    let traces = f64::try_from(s1.trace() + s2.trace())?;
    Ok(mean_term + traces - 2.0 * trace_sqrt_product(s1, s2)?)
}

/// The reference's `FIDMetric()(y_pred, y)` (symmetric in its arguments).
pub fn fid(y_pred: &Tensor, y: &Tensor) -> Result<f64> {
    check(y_pred, y)?;
    let (m1, s1) = statistics(y_pred)?;
    let (m2, s2) = statistics(y)?;
    frechet_distance(&m1, &s1, &m2, &s2)
}

/// One feature set's FID statistics: mean and covariance (float64, 1/(N-1)), the sample count,
/// and optionally the features themselves (KID needs them: it resamples subsets). Saved as
/// `.safetensors` with tensors `mu`, `sigma` (and `features`) and the count in the metadata.
#[derive(Debug)]
pub struct FeatureStats {
    /// `(d,)` float64.
    pub mu: Tensor,
    /// `(d, d)` float64.
    pub sigma: Tensor,
    pub count: i64,
    /// `(N, d)` as extracted, when kept.
    pub features: Option<Tensor>,
    /// Free-form provenance (feature network, source list, ...), stored in the file's header.
    pub metadata: BTreeMap<String, String>,
}

impl FeatureStats {
    pub fn from_features(features: &Tensor, keep_features: bool) -> Result<Self> {
        let s = features.size();
        ensure!(s.len() == 2, "features must be (samples, dims), got {s:?}");
        let (mu, sigma) = statistics(features)?;
        let features = keep_features.then(|| features.to_device(Device::Cpu).contiguous());
        Ok(Self { mu, sigma, count: s[0], features, metadata: BTreeMap::new() })
    }

    pub fn dims(&self) -> i64 {
        self.mu.size()[0]
    }

    /// FID against another set's statistics (the same value as [`fid`] of the two feature sets).
    pub fn fid(&self, other: &FeatureStats) -> Result<f64> {
        frechet_distance(&self.mu, &self.sigma, &other.mu, &other.sigma)
    }

    /// Writes the file atomically (temporary name, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut sd = StateDict::new();
        sd.insert("mu", self.mu.shallow_clone());
        sd.insert("sigma", self.sigma.shallow_clone());
        if let Some(f) = &self.features {
            sd.insert("features", f.shallow_clone());
        }
        let mut meta = self.metadata.clone();
        meta.insert(META_COUNT.into(), self.count.to_string());
        sd.save_safetensors(path, &meta).with_context(|| format!("cannot save FID statistics to {}", path.display()))
    }

    /// Reads a file [`save`](Self::save) wrote, checking its shapes and dtypes.
    pub fn load(path: &Path) -> Result<Self> {
        let mut sd =
            StateDict::load(path, None).with_context(|| format!("cannot read FID statistics {}", path.display()))?;
        let mut take = |name: &str| sd.remove(name);
        let (mu, sigma, features) = (take("mu"), take("sigma"), take("features"));
        let bad = |what: String| anyhow::anyhow!("{}: not a medgen FID statistics file: {what}", path.display());
        let mu = mu.ok_or_else(|| bad("no `mu` tensor".into()))?;
        let sigma = sigma.ok_or_else(|| bad("no `sigma` tensor".into()))?;
        let d = mu.size().first().copied().unwrap_or(0);
        if mu.size() != [d] || sigma.size() != [d, d] || d == 0 {
            return Err(bad(format!("`mu` {:?} and `sigma` {:?} are not (d,) and (d, d)", mu.size(), sigma.size())));
        }
        if mu.kind() != Kind::Double || sigma.kind() != Kind::Double {
            return Err(bad(format!("`mu` and `sigma` must be float64, got {:?} and {:?}", mu.kind(), sigma.kind())));
        }
        let mut metadata = std::mem::take(&mut sd.metadata);
        let count = metadata.remove(META_COUNT).ok_or_else(|| bad(format!("no `{META_COUNT}` in the header")))?;
        let count: i64 = count.parse().map_err(|_| bad(format!("`{META_COUNT}` = {count:?} is not a count")))?;
        if let Some(f) = &features {
            if f.size() != [count, d] {
                return Err(bad(format!("`features` {:?} is not ({count}, {d})", f.size())));
            }
        }
        Ok(Self { mu, sigma, count, features, metadata })
    }
}

/// torchmetrics' `KernelInceptionDistance` settings.
#[derive(Debug, Clone, Copy)]
pub struct KidConfig {
    pub subsets: usize,
    /// Capped at the smaller set's size.
    pub subset_size: usize,
    pub degree: i32,
    /// `None`: 1/d.
    pub gamma: Option<f64>,
    pub coef: f64,
    pub seed: i64,
}

impl Default for KidConfig {
    fn default() -> Self {
        Self { subsets: 100, subset_size: 1000, degree: 3, gamma: None, coef: 1.0, seed: 0 }
    }
}

/// KID's mean over subsets and its population std (torchmetrics' `std(unbiased=False)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kid {
    pub mean: f64,
    pub std: f64,
}

fn poly_mmd(f1: &Tensor, f2: &Tensor, cfg: &KidConfig) -> Result<f64> {
    let d = f1.size()[1] as f64;
    let gamma = cfg.gamma.unwrap_or(1.0 / d);
    let k =
        |a: &Tensor, b: &Tensor| (a.matmul(&b.transpose(0, 1)) * gamma + cfg.coef).pow_tensor_scalar(cfg.degree as i64);
    let (k11, k22, k12) = (k(f1, f1), k(f2, f2), k(f1, f2));
    let m = f1.size()[0] as f64;
    let off =
        |k: &Tensor| -> Result<f64> { Ok(f64::try_from(k.sum(Kind::Double) - k.diagonal(0, 0, 1).sum(Kind::Double))?) };
    let kt_xx = off(&k11)? / (m * (m - 1.0));
    let kt_yy = off(&k22)? / (m * (m - 1.0));
    let k_xy = f64::try_from(k12.sum(Kind::Double))? / (m * m);
    Ok(kt_xx + kt_yy - 2.0 * k_xy)
}

static KID_DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// KID of `real` and `fake` features: per subset, `randperm(n_real)[:m]` then `randperm(n_fake)[:m]`
/// after `manual_seed(cfg.seed)`, as torchmetrics draws them (this reseeds torch's global generator).
pub fn kid(fake: &Tensor, real: &Tensor, cfg: &KidConfig) -> Result<Kid> {
    check(fake, real)?;
    ensure!(cfg.subsets >= 1, "KID needs at least one subset");
    let (fake, real) =
        (fake.to_kind(Kind::Double).to_device(Device::Cpu), real.to_kind(Kind::Double).to_device(Device::Cpu));
    let (nf, nr) = (fake.size()[0], real.size()[0]);
    let m = (cfg.subset_size as i64).min(nf).min(nr);
    ensure!(m >= 2, "KID subsets need at least 2 samples");
    // tch exposes no generator objects, so the draws come from the global one; two KIDs on
    // different threads would interleave them and both lose reproducibility.
    let _draws = KID_DRAWS.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(cfg.seed);
    let mut scores = Vec::with_capacity(cfg.subsets);
    for _ in 0..cfg.subsets {
        let pr = Tensor::randperm(nr, (Kind::Int64, Device::Cpu)).narrow(0, 0, m);
        let pf = Tensor::randperm(nf, (Kind::Int64, Device::Cpu)).narrow(0, 0, m);
        scores.push(poly_mmd(&real.index_select(0, &pr), &fake.index_select(0, &pf), cfg)?);
    }
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let std = (scores.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / n).sqrt();
    Ok(Kid { mean, std })
}
