//! SSIM and MS-SSIM as MONAI computes them (`monai.metrics.SSIMMetric` / `MultiScaleSSIMMetric` in MONAI 1.6.1 and
//! `generative.metrics` in monai-generative 0.2.3, the same code; reference-repo.md §5.1), for 2-D images
//! `(batch, channels, height, width)` and volumes `(batch, channels, height, width, depth)`, one value per image.
//!
//! What makes these numbers MONAI's and not some other SSIM's:
//! - the window is applied as a "valid" grouped conv (no padding), so the border pixels only count through the
//!   windows that fit entirely inside the image;
//! - local statistics are `E[x^2] - E[x]^2` (not the unbiased covariance of the original paper);
//! - each image's value is the mean over channels *and* pixels together;
//! - MS-SSIM clamps each scale's mean with `relu` before the weighted product, so anti-correlated images give 0
//!   rather than NaN, and downsamples with `avg_pool{2,3}d(2)` (odd sizes lose their last row/column);
//! - the inputs are cast to float32 for the statistics whatever their dtype, but the MS-SSIM pyramid is pooled in
//!   the input's own dtype (MONAI casts inside each scale's SSIM call, not before the loop).
//!
//! The expressions below keep MONAI's operation order, so on the same libtorch they agree to the bit (the parity
//! tests check it).
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Mutex, PoisonError};
use tch::{Device, Kind, Tensor};

/// MS-SSIM's per-scale exponents (Wang et al. 2003), MONAI's default and the reference's.
pub const MS_SSIM_WEIGHTS: [f64; 5] = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333];

/// The window the reference passes (`kernel_size=7`): MONAI's default of 11 fails MS-SSIM's size check at 160x224.
pub const REFERENCE_KERNEL_SIZE: i64 = 7;

/// MONAI's default window (`kernel_size` / `win_size` = 11), for reproducing a plain `SSIMMetric(spatial_dims=2)`.
pub const MONAI_KERNEL_SIZE: i64 = 11;

/// MONAI's `KernelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelType {
    /// Separable Gaussian, normalised to sum 1 per axis.
    #[default]
    Gaussian,
    /// Box filter, every weight `1 / (kh * kw)`.
    Uniform,
}

/// One value for every spatial axis, or one per axis (MONAI's `int | Sequence[int]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerAxis<T> {
    Same(T),
    Each(Vec<T>),
}

impl<T: Copy> PerAxis<T> {
    /// One value per spatial axis (`[height, width]` or `[height, width, depth]`); `validate` checks an explicit
    /// list has `spatial_dims` entries.
    pub fn get(&self, spatial_dims: usize) -> Vec<T> {
        match self {
            PerAxis::Same(v) => vec![*v; spatial_dims],
            PerAxis::Each(v) => v.clone(),
        }
    }

    fn len_ok(&self, spatial_dims: usize) -> bool {
        match self {
            PerAxis::Same(_) => true,
            PerAxis::Each(v) => v.len() == spatial_dims,
        }
    }
}

fn two() -> i64 {
    2
}

fn one() -> f64 {
    1.0
}

fn reference_kernel() -> PerAxis<i64> {
    PerAxis::Same(REFERENCE_KERNEL_SIZE)
}

fn sigma() -> PerAxis<f64> {
    PerAxis::Same(1.5)
}

fn k1() -> f64 {
    0.01
}

fn k2() -> f64 {
    0.03
}

fn weights() -> Vec<f64> {
    MS_SSIM_WEIGHTS.to_vec()
}

/// The constructor arguments of MONAI's `SSIMMetric` / `MultiScaleSSIMMetric` (their names; MONAI 1.6.1's
/// `SSIMMetric` calls the window `win_size`, accepted as an alias). Defaults are the reference's: everything as
/// MONAI except `kernel_size`, which is 7 ([`REFERENCE_KERNEL_SIZE`]) where MONAI says 11
/// ([`SsimConfig::monai_default`]). `weights` only matters to MS-SSIM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsimConfig {
    /// 2 (images) or 3 (volumes).
    #[serde(default = "two")]
    pub spatial_dims: i64,
    /// The value range of the images (1 for [0, 1], 255 for 8-bit): it scales the stability constants.
    #[serde(default = "one")]
    pub data_range: f64,
    #[serde(default)]
    pub kernel_type: KernelType,
    #[serde(default = "reference_kernel", alias = "win_size")]
    pub kernel_size: PerAxis<i64>,
    /// Standard deviation of the Gaussian window (ignored by the uniform one).
    #[serde(default = "sigma")]
    pub kernel_sigma: PerAxis<f64>,
    #[serde(default = "k1")]
    pub k1: f64,
    #[serde(default = "k2")]
    pub k2: f64,
    /// One exponent per MS-SSIM scale; their count is the number of scales.
    #[serde(default = "weights")]
    pub weights: Vec<f64>,
}

impl Default for SsimConfig {
    fn default() -> Self {
        Self::reference()
    }
}

impl SsimConfig {
    /// `MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=7)`: every MS-SSIM of the reference.
    pub fn reference() -> Self {
        Self {
            spatial_dims: 2,
            data_range: 1.0,
            kernel_type: KernelType::Gaussian,
            kernel_size: reference_kernel(),
            kernel_sigma: sigma(),
            k1: k1(),
            k2: k2(),
            weights: weights(),
        }
    }

    /// MONAI's own defaults (`kernel_size=11`), which need images of at least 176 pixels per side for MS-SSIM.
    pub fn monai_default() -> Self {
        Self { kernel_size: PerAxis::Same(MONAI_KERNEL_SIZE), ..Self::reference() }
    }

    pub fn with_kernel_size(mut self, kernel_size: i64) -> Self {
        self.kernel_size = PerAxis::Same(kernel_size);
        self
    }

    pub fn with_data_range(mut self, data_range: f64) -> Self {
        self.data_range = data_range;
        self
    }

    /// Rejects what MONAI would only fail on later (or silently turn into NaN).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            matches!(self.spatial_dims, 2 | 3),
            "SSIM: spatial_dims must be 2 (images) or 3 (volumes), got {}",
            self.spatial_dims
        );
        let n = self.spatial_dims as usize;
        ensure!(
            self.kernel_size.len_ok(n) && self.kernel_sigma.len_ok(n),
            "SSIM: kernel_size {:?} and kernel_sigma {:?} need one value or {n} (one per spatial axis)",
            self.kernel_size,
            self.kernel_sigma
        );
        let k = self.kernel_size.get(n);
        ensure!(k.iter().all(|&k| k >= 1), "SSIM: kernel_size must be positive, got {k:?}");
        if self.kernel_type == KernelType::Gaussian {
            let sigma = self.kernel_sigma.get(n);
            ensure!(sigma.iter().all(|&s| s > 0.0), "SSIM: kernel_sigma must be positive, got {sigma:?}");
        }
        ensure!(self.data_range > 0.0, "SSIM: data_range must be positive, got {}", self.data_range);
        ensure!(!self.weights.is_empty(), "MS-SSIM: weights must not be empty");
        Ok(())
    }

    /// `(k1 * data_range)^2` and `(k2 * data_range)^2`, in f64 as Python computes them (libtorch rounds them to the
    /// tensors' float32 when adding).
    fn constants(&self) -> (f64, f64) {
        ((self.k1 * self.data_range).powi(2), (self.k2 * self.data_range).powi(2))
    }

    /// MONAI's `weights_div`: `max(1, len(weights) - 1) ** 2`. Squared, not `2 ** (len - 1)`: the two agree only for
    /// 3 and 5 weights, and MONAI's check uses this one.
    fn weights_div(&self) -> i64 {
        let n = self.weights.len().saturating_sub(1).max(1) as i64;
        n * n
    }
}

/// MONAI's 1-D Gaussian: `arange((1-k)/2, (1+k)/2)` in float32, `exp(-(d/sigma)^2/2)`, divided by its sum.
fn gaussian_1d(size: i64, sigma: f64) -> Tensor {
    let start = (1 - size) as f64 / 2.0;
    let end = (1 + size) as f64 / 2.0;
    let dist = Tensor::arange_start_step(start, end, 1.0, (Kind::Float, Device::Cpu));
    let gauss = ((dist / sigma).pow_tensor_scalar(2i64).neg() / 2i64).exp();
    let total = gauss.sum(None);
    (gauss / total).unsqueeze(0)
}

/// The window MONAI builds, `(kh, kw[, kd])` float32 on the CPU: the outer product of the per-axis Gaussians
/// (MONAI's `_gaussian_kernel`: the 2-D product, then for volumes repeated along the depth and multiplied by the
/// depth Gaussian), or the uniform `1 / prod(kernel_size)`.
pub fn window(kernel_type: KernelType, kernel_size: &[i64], kernel_sigma: &[f64]) -> Tensor {
    match kernel_type {
        KernelType::Gaussian => {
            let k2 =
                gaussian_1d(kernel_size[0], kernel_sigma[0]).tr().matmul(&gaussian_1d(kernel_size[1], kernel_sigma[1]));
            if kernel_size.len() == 2 {
                return k2;
            }
            let (k0, k1, kd) = (kernel_size[0], kernel_size[1], kernel_size[2]);
            let gz = gaussian_1d(kd, kernel_sigma[2]).unsqueeze(0).expand([k0, k1, kd], false);
            k2.unsqueeze(-1).repeat([1, 1, kd]) * gz
        }
        KernelType::Uniform => {
            Tensor::ones(kernel_size, (Kind::Float, Device::Cpu)) / kernel_size.iter().product::<i64>()
        }
    }
}

/// The constant tensors of the metrics (windows, MS-SSIM weights) already on a device, by what they are: built on
/// the CPU and moved once per process instead of at every call (each batch of an evaluation).
static ON_DEVICE: Mutex<Vec<(String, Device, Tensor)>> = Mutex::new(Vec::new());

fn on_device(key: String, device: Device, make: impl FnOnce() -> Tensor) -> Tensor {
    let mut made = ON_DEVICE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, _, t)) = made.iter().find(|(k, d, _)| *k == key && *d == device) {
        return t.shallow_clone();
    }
    let t = make();
    made.push((key, device, t.shallow_clone()));
    t
}

/// The window of one scale, expanded to `(channels, 1, kh, kw[, kd])` for a grouped conv on `device`.
struct Window {
    kernel: Tensor,
    groups: i64,
    size: Vec<i64>,
}

impl Window {
    fn new(cfg: &SsimConfig, channels: i64, device: Device) -> Self {
        let n = cfg.spatial_dims as usize;
        let size = cfg.kernel_size.get(n);
        let sigma = cfg.kernel_sigma.get(n);
        let key = format!("window {:?} {size:?} {sigma:?} {channels}", cfg.kernel_type);
        let kernel = on_device(key, device, || {
            let k = window(cfg.kernel_type, &size, &sigma);
            k.expand([&[channels, 1][..], &size[..]].concat().as_slice(), false).contiguous().to_device(device)
        });
        Self { kernel, groups: channels, size }
    }

    /// `conv{2,3}d(x, kernel, groups)`: stride 1, no padding.
    fn conv(x: &Tensor, kernel: &Tensor, groups: i64) -> Tensor {
        let n = kernel.dim() - 2;
        let (one, zero) = (vec![1i64; n], vec![0i64; n]);
        match n {
            2 => x.conv2d(kernel, None::<Tensor>, one.as_slice(), zero.as_slice(), one.as_slice(), groups),
            _ => x.conv3d(kernel, None::<Tensor>, one.as_slice(), zero.as_slice(), one.as_slice(), groups),
        }
    }

    fn apply(&self, x: &Tensor) -> Tensor {
        Self::conv(x, &self.kernel, self.groups)
    }

    /// The same conv over a block `(P, C, spatial...)` folded into one image of `P * C` channels,
    /// `groups = P * C`. libtorch's depthwise path is several times faster than the batched single-channel conv
    /// here, and gives the same bits (each output is still the one window over one plane).
    fn apply_folded(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let planes = s[0] * s[1];
        let kernel = self
            .kernel
            .narrow(0, 0, 1)
            .expand([&[planes, 1][..], &self.size[..]].concat().as_slice(), false)
            .contiguous();
        let out: Vec<i64> =
            s[..2].iter().copied().chain(s[2..].iter().zip(&self.size).map(|(&n, &k)| n - k + 1)).collect();
        let folded: Vec<i64> = [1, planes].into_iter().chain(s[2..].iter().copied()).collect();
        Self::conv(&x.view(folded.as_slice()), &kernel, planes).view(out.as_slice())
    }
}

/// One side's local statistics at one scale: the float32 image, `mu = E[x]` and `sigma = E[x^2] - mu^2`.
/// Everything the pair needs except `E[xy]`, hence computed once per image in the diversity loop.
struct Moments {
    x: Tensor,
    mu: Tensor,
    sigma: Tensor,
}

impl Moments {
    fn new(x: &Tensor, w: &Window) -> Self {
        let x = x.to_kind(Kind::Float);
        let mu = w.apply(&x);
        let sigma = w.apply(&(&x * &x)) - &mu * &mu;
        Self { x, mu, sigma }
    }

    /// Images `start..start+len` (a view).
    fn narrow(&self, start: i64, len: i64) -> Self {
        Self {
            x: self.x.narrow(0, start, len),
            mu: self.mu.narrow(0, start, len),
            sigma: self.sigma.narrow(0, start, len),
        }
    }
}

/// `(ssim_map, cs_map)` of `x` (y_pred) against `y`, broadcasting over the batch (a single `x` against a block of
/// `y` in the diversity loop). The luminance term is only computed when asked: MS-SSIM needs it at its last scale.
fn ssim_cs_maps(x: &Moments, y: &Moments, w: &Window, c1: f64, c2: f64, with_ssim: bool) -> (Option<Tensor>, Tensor) {
    let sigma_xy = w.apply(&(&x.x * &y.x)) - &x.mu * &y.mu;
    let cs = (sigma_xy * 2i64 + c2) / (&x.sigma + &y.sigma + c2);
    let ssim = with_ssim.then(|| {
        let num = &x.mu * 2i64 * &y.mu + c1;
        let den = x.mu.pow_tensor_scalar(2i64) + y.mu.pow_tensor_scalar(2i64) + c1;
        num / den * &cs
    });
    (ssim, cs)
}

/// [`ssim_cs_maps`] for one image `x` against a block of images `y`, with the folded conv and in-place arithmetic
/// (each full-size temporary costs a fresh allocation and its page faults). Same operations in the same order, so
/// the same bits.
fn ssim_cs_block(x: &Moments, y: &Moments, w: &Window, c1: f64, c2: f64, with_ssim: bool) -> (Option<Tensor>, Tensor) {
    let mut cs = w.apply_folded(&(&x.x * &y.x));
    cs -= &x.mu * &y.mu;
    cs *= 2i64;
    cs += c2;
    let mut den = &x.sigma + &y.sigma;
    den += c2;
    cs /= &den;
    let ssim = with_ssim.then(|| {
        let mut num = &x.mu * 2i64 * &y.mu;
        num += c1;
        let mut den = x.mu.pow_tensor_scalar(2i64) + y.mu.pow_tensor_scalar(2i64);
        den += c1;
        num /= &den;
        num *= &cs;
        num
    });
    (ssim, cs)
}

/// `map.view(B, -1).mean(1)`: over channels and pixels together.
fn per_image_mean(map: &Tensor) -> Tensor {
    let b = map.size()[0];
    map.reshape([b, -1]).mean_dim(1, false, None)
}

/// `avg_pool{2,3}d(x, kernel_size=2)`: stride 2, floor mode, no padding.
fn downsample(x: &Tensor) -> Tensor {
    match x.dim() {
        4 => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None),
        _ => x.avg_pool3d([2, 2, 2], [2, 2, 2], [0, 0, 0], false, true, None),
    }
}

/// MONAI's checks on a pair: same shape (RegressionMetric), 4 dimensions for images, 5 for volumes.
fn check_pair(y_pred: &Tensor, y: &Tensor, what: &str, cfg: &SsimConfig) -> Result<()> {
    ensure!(y_pred.size() == y.size(), "{what}: y_pred and y shapes differ: {:?} and {:?}", y_pred.size(), y.size());
    check_images(y_pred, what, cfg)
}

fn check_images(x: &Tensor, what: &str, cfg: &SsimConfig) -> Result<()> {
    let layout = if cfg.spatial_dims == 2 {
        "2-D images (batch, channels, height, width)"
    } else {
        "volumes (batch, channels, height, width, depth)"
    };
    ensure!(
        x.dim() == 2 + cfg.spatial_dims as usize,
        "{what}: spatial_dims {} expects {layout}, got shape {:?}",
        cfg.spatial_dims,
        x.size()
    );
    Ok(())
}

const AXES: [&str; 3] = ["height", "width", "depth"];

/// MONAI's MS-SSIM size check: every side `// weights_div` must exceed `kernel_size - 1`, i.e. the smallest scale
/// keeps at least one full window. (MONAI's own message says "larger than (k-1)*div", which understates the
/// minimum: the condition is on the floor division, so the side must be at least `k * div`.)
pub fn check_ms_ssim_size(size: &[i64], cfg: &SsimConfig) -> Result<()> {
    let n = cfg.spatial_dims as usize;
    ensure!(size.len() == 2 + n, "MS-SSIM: spatial_dims {n} expects {} dimensions, got shape {size:?}", 2 + n);
    let div = cfg.weights_div();
    let kernel = cfg.kernel_size.get(n);
    for (axis, (&side, &k)) in AXES.iter().zip(size[2..].iter().zip(&kernel)) {
        if side / div < k {
            bail!(
                "MS-SSIM: image {axis} {side} is too small for {n} weights and kernel_size {k} (image {image}, \
                 kernel {kern}): MONAI requires {axis} // {div} > {km1}, i.e. {axis} >= {min}; use a smaller \
                 kernel_size (the reference uses 7 for 160x224) or fewer weights",
                n = cfg.weights.len(),
                image = by(&size[2..]),
                kern = by(&kernel),
                km1 = k - 1,
                min = k * div,
            );
        }
    }
    Ok(())
}

/// `160x224`.
fn by(v: &[i64]) -> String {
    v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("x")
}

/// SSIM needs at least one whole window (MONAI leaves this to conv's error).
fn check_window_fits(size: &[i64], cfg: &SsimConfig) -> Result<()> {
    let k = cfg.kernel_size.get(cfg.spatial_dims as usize);
    ensure!(
        size[2..].iter().zip(&k).all(|(&n, &k)| n >= k),
        "SSIM: image {} is smaller than the {} window",
        by(&size[2..]),
        by(&k)
    );
    Ok(())
}

/// MONAI's `compute_ssim_and_cs`: the SSIM and contrast-sensitivity maps, `(B, C, H-kh+1, W-kw+1)` float32.
pub fn ssim_and_cs(y_pred: &Tensor, y: &Tensor, cfg: &SsimConfig) -> Result<(Tensor, Tensor)> {
    cfg.validate()?;
    check_pair(y_pred, y, "SSIM", cfg)?;
    check_window_fits(&y_pred.size(), cfg)?;
    Ok(tch::no_grad(|| {
        let (c1, c2) = cfg.constants();
        let w = Window::new(cfg, y_pred.size()[1], y_pred.device());
        let (ssim, cs) = ssim_cs_maps(&Moments::new(y_pred, &w), &Moments::new(y, &w), &w, c1, c2, true);
        (ssim.expect("requested"), cs)
    }))
}

/// `SSIMMetric(spatial_dims, ...)(y_pred, y)`: one float32 value per image, shape `(B,)` (MONAI returns
/// `(B, 1)`). Symmetric in its arguments.
pub fn ssim(y_pred: &Tensor, y: &Tensor, cfg: &SsimConfig) -> Result<Tensor> {
    let (ssim, _) = ssim_and_cs(y_pred, y, cfg)?;
    Ok(per_image_mean(&ssim))
}

/// `prod(stack(levels) ** weights.view(-1, 1), dim=0)` with float32 weights, as MONAI combines the scales.
fn combine(levels: &[Tensor], cfg: &SsimConfig, device: Device) -> Tensor {
    let weights = on_device(format!("weights {:?}", cfg.weights), device, || {
        Tensor::from_slice(&cfg.weights).to_kind(Kind::Float).to_device(device)
    });
    Tensor::stack(levels, 0).pow(&weights.view([-1, 1])).prod_dim_int(0, false, None)
}

/// `MultiScaleSSIMMetric(spatial_dims, ...)(y_pred, y)`: one float32 value per image, shape `(B,)` (MONAI
/// returns `(B, 1)`). Symmetric in its arguments. Fails, naming the sizes, when the images are too small for the
/// number of scales and the window ([`check_ms_ssim_size`]).
pub fn ms_ssim(y_pred: &Tensor, y: &Tensor, cfg: &SsimConfig) -> Result<Tensor> {
    cfg.validate()?;
    check_pair(y_pred, y, "MS-SSIM", cfg)?;
    check_ms_ssim_size(&y_pred.size(), cfg)?;
    Ok(tch::no_grad(|| {
        let (c1, c2) = cfg.constants();
        let w = Window::new(cfg, y_pred.size()[1], y_pred.device());
        let scales = cfg.weights.len();
        let (mut a, mut b) = (y_pred.shallow_clone(), y.shallow_clone());
        let mut levels = Vec::with_capacity(scales);
        for s in 0..scales {
            let last = s + 1 == scales;
            let (ssim, cs) = ssim_cs_maps(&Moments::new(&a, &w), &Moments::new(&b, &w), &w, c1, c2, last);
            // The last scale's contrast term is replaced by its full SSIM.
            levels.push(per_image_mean(ssim.as_ref().unwrap_or(&cs)).relu());
            if !last {
                a = downsample(&a);
                b = downsample(&b);
            }
        }
        combine(&levels, cfg, y_pred.device())
    }))
}

/// How many image pairs one batched step of [`ms_ssim_pairwise`] evaluates at most: enough to amortise the per-op
/// overhead at the small scales, small enough that each full-resolution temporary (~4 MB) stays in cache. Measured
/// at 160x224 on one core: 16-48 pairs per step run in 0.25 ms per pair, 117 in 0.38 ms, 4 in 0.53 ms.
fn default_chunk_pairs(size: &[i64]) -> usize {
    let per_image = size[1..].iter().product::<i64>().max(1) as usize;
    ((1usize << 20) / per_image).clamp(1, 1024)
}

/// What one worker of [`ms_ssim_pairwise`] needs: every scale's [`Moments`] of all images and the window. Tensors
/// are `Send` but not `Sync`, so each worker gets its own shallow copies (same storage).
struct PairJob<'a> {
    pyramid: Vec<Moments>,
    w: Window,
    cfg: &'a SsimConfig,
    c1: f64,
    c2: f64,
}

impl PairJob<'_> {
    fn shallow_clone(&self) -> Self {
        let pyramid = self
            .pyramid
            .iter()
            .map(|m| Moments { x: m.x.shallow_clone(), mu: m.mu.shallow_clone(), sigma: m.sigma.shallow_clone() })
            .collect();
        let w = Window { kernel: self.w.kernel.shallow_clone(), groups: self.w.groups, size: self.w.size.clone() };
        Self { pyramid, w, cfg: self.cfg, c1: self.c1, c2: self.c2 }
    }

    /// MS-SSIM of image `i` against images `j0..j0+len`.
    fn block(&self, i: i64, j0: i64, len: i64) -> Result<Vec<f32>> {
        let scales = self.pyramid.len();
        let mut levels = Vec::with_capacity(scales);
        for (s, m) in self.pyramid.iter().enumerate() {
            let last = s + 1 == scales;
            let (ssim, cs) = ssim_cs_block(&m.narrow(i, 1), &m.narrow(j0, len), &self.w, self.c1, self.c2, last);
            levels.push(per_image_mean(ssim.as_ref().unwrap_or(&cs)).relu());
        }
        let device = self.w.kernel.device();
        Ok(Vec::<f32>::try_from(combine(&levels, self.cfg, device).to_device(Device::Cpu))?)
    }
}

/// Sets libtorch's intra-op thread count for a scope and restores it after (on panic too).
struct IntraOpThreads(i32);

impl IntraOpThreads {
    fn set(n: i32) -> Self {
        let old = tch::get_num_threads();
        tch::set_num_threads(n);
        Self(old)
    }
}

impl Drop for IntraOpThreads {
    fn drop(&mut self) {
        tch::set_num_threads(self.0);
    }
}

/// MS-SSIM of every pair of `images` `(N, C, spatial...)`: an `(N, N)` float32 matrix on the CPU, symmetric, with NaN on
/// the diagonal (the reference never compares an image with itself). Each value equals `ms_ssim` of that pair, to
/// the bit.
///
/// It is the reference's sample-diversity loop (reference-repo.md §5.3) without its redundancy: MS-SSIM is
/// symmetric to the bit, so only `i < j` is evaluated, and each image's pyramid, `E[x]` and `E[x^2] - E[x]^2` are
/// computed once per scale; a pair only costs its `E[xy]` conv and the elementwise terms. Pairs go through in
/// blocks (`x_i` against up to `chunk_pairs` images `j > i`; `None` picks a size from the image size).
/// `progress(done, total)` is called after every block.
///
/// On the CPU, with libtorch allowed `T > 1` threads, the rows are shared among `T` worker threads that each run
/// libtorch single-threaded (the thread count is set to 1 for the duration of the call, then restored): the
/// per-op parallelism of libtorch spends most of its time in barriers on these many small ops, badly so when the
/// cores are shared. On other devices the blocks run in order on the calling thread.
pub fn ms_ssim_pairwise(
    images: &Tensor,
    cfg: &SsimConfig,
    chunk_pairs: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    cfg.validate()?;
    check_images(images, "MS-SSIM diversity", cfg)?;
    let size = images.size();
    check_ms_ssim_size(&size, cfg)?;
    let n = size[0];
    ensure!(n >= 2, "MS-SSIM diversity needs at least 2 images, got {n}");
    let chunk = chunk_pairs.unwrap_or_else(|| default_chunk_pairs(&size)).max(1) as i64;
    let device = images.device();
    let total = (n * (n - 1) / 2) as usize;
    let mut matrix = vec![f32::NAN; (n * n) as usize];
    let mut done = 0usize;
    let mut store = |i: i64, j0: i64, values: Vec<f32>| {
        for (k, v) in values.iter().enumerate() {
            let j = j0 + k as i64;
            matrix[(i * n + j) as usize] = *v;
            matrix[(j * n + i) as usize] = *v;
        }
        done += values.len();
        progress(done, total);
    };

    let job = tch::no_grad(|| {
        let w = Window::new(cfg, size[1], device);
        let scales = cfg.weights.len();
        let mut pyramid = Vec::with_capacity(scales);
        let mut level = images.shallow_clone();
        for s in 0..scales {
            pyramid.push(Moments::new(&level, &w));
            if s + 1 < scales {
                level = downsample(&level);
            }
        }
        let (c1, c2) = cfg.constants();
        PairJob { pyramid, w, cfg, c1, c2 }
    });
    let workers = if device == Device::Cpu { tch::get_num_threads().max(1) as i64 } else { 1 }.min(n - 1);

    if workers == 1 {
        tch::no_grad(|| -> Result<()> {
            for i in 0..n - 1 {
                let mut j0 = i + 1;
                while j0 < n {
                    let len = chunk.min(n - j0);
                    store(i, j0, job.block(i, j0, len)?);
                    j0 += len;
                }
            }
            Ok(())
        })?;
    } else {
        let _threads = IntraOpThreads::set(1);
        let next_row = AtomicI64::new(0);
        let (tx, rx) = mpsc::channel::<Result<(i64, i64, Vec<f32>)>>();
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..workers {
                let (job, tx, next_row) = (job.shallow_clone(), tx.clone(), &next_row);
                scope.spawn(move || {
                    // A new thread starts with grad mode on and its own OpenMP settings.
                    tch::set_num_threads(1);
                    tch::no_grad(|| loop {
                        // Rows in order: the long ones first, so the workers finish together.
                        let i = next_row.fetch_add(1, Ordering::Relaxed);
                        if i >= n - 1 {
                            return;
                        }
                        let mut j0 = i + 1;
                        while j0 < n {
                            let len = chunk.min(n - j0);
                            let result = job.block(i, j0, len).map(|v| (i, j0, v));
                            let failed = result.is_err();
                            // A closed channel means the caller stopped on an error.
                            if tx.send(result).is_err() || failed {
                                return;
                            }
                            j0 += len;
                        }
                    })
                });
            }
            drop(tx);
            for message in rx {
                let (i, j0, values) = message?;
                store(i, j0, values);
            }
            Ok(())
        })?;
    }
    Ok(Tensor::from_slice(&matrix).view([n, n]))
}

/// The reference's sample-diversity score: the mean MS-SSIM over all pairs of distinct images (its ordered pairs
/// `i != j` give the same mean, each value twice), accumulated in f64. Lower means more diverse samples.
pub fn ms_ssim_diversity(images: &Tensor, cfg: &SsimConfig) -> Result<f64> {
    let matrix = ms_ssim_pairwise(images, cfg, None, &mut |_, _| {})?;
    upper_triangle_mean(&matrix)
}

/// Mean of the strict upper triangle of a square `(N, N)` matrix (N >= 2), accumulated in f64.
pub fn upper_triangle_mean(matrix: &Tensor) -> Result<f64> {
    let size = matrix.size();
    ensure!(size.len() == 2 && size[0] == size[1] && size[0] >= 2, "expected an (N, N) matrix, N >= 2, got {size:?}");
    let n = size[0] as usize;
    let values = Vec::<f64>::try_from(matrix.to_kind(Kind::Double).to_device(Device::Cpu).flatten(0, -1))?;
    let sum: f64 = (0..n).flat_map(|i| values[i * n + i + 1..(i + 1) * n].iter()).sum();
    Ok(sum / (n * (n - 1) / 2) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_window_is_normalised_and_symmetric() {
        let w = window(KernelType::Gaussian, &[7, 7], &[1.5, 1.5]);
        assert_eq!(w.size(), [7, 7]);
        let total = f64::try_from(w.sum(Kind::Double)).unwrap();
        assert!((total - 1.0).abs() < 1e-6, "sum {total}");
        assert!(w.equal(&w.tr()));
        assert!(w.equal(&w.flip([0])));
    }

    #[test]
    fn a_window_is_built_once_per_device() {
        let cfg = SsimConfig::reference();
        let (a, b) = (Window::new(&cfg, 3, Device::Cpu), Window::new(&cfg, 3, Device::Cpu));
        assert_eq!(a.kernel.data_ptr(), b.kernel.data_ptr(), "the second call built the window again");
        assert_ne!(a.kernel.data_ptr(), Window::new(&cfg, 2, Device::Cpu).kernel.data_ptr());
        assert_eq!(a.kernel.size(), [3, 1, 7, 7]);
    }

    #[test]
    fn identical_images_score_one_and_size_check_names_sizes() {
        let x = Tensor::rand([2, 1, 160, 224], (Kind::Float, Device::Cpu));
        let v = Vec::<f32>::try_from(ms_ssim(&x, &x, &SsimConfig::reference()).unwrap()).unwrap();
        assert!(v.iter().all(|v| (v - 1.0).abs() < 1e-5), "{v:?}");
        let err = ms_ssim(&x, &x, &SsimConfig::monai_default()).unwrap_err().to_string();
        assert!(err.contains("160") && err.contains("176"), "{err}");
    }
}
