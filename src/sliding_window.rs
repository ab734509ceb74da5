//! MONAI's `sliding_window_inference` (`monai/inferers/utils.py`, as `SlidingWindowInferer` calls it), for a
//! predictor whose output may be a whole multiple of its window (an autoencoder's decoder: a latent window of
//! `roi_size` decodes to `4 * roi_size` voxels). Peak memory is the full output and its weight map plus one window's
//! activations, not the whole decode.
//!
//! What makes the result MONAI's, to the bit on the same libtorch:
//! - the input is padded (constant `cval`) up to `roi_size` where it is smaller, split as MONAI splits it;
//! - windows start every `int(roi * (1 - overlap))` voxels, the last one pulled back to end at the border, in
//!   `meshgrid(indexing="ij")` order (the first spatial dimension slowest); `sw_batch_size` consecutive windows of the
//!   whole batch go through the predictor together;
//! - the weight map (ones, or an unnormalised Gaussian of sigma `sigma_scale * roi`, clamped below at
//!   `max(min, 1e-3)`) is made at the window's input size and, when the output is larger, stretched with
//!   `nearest-exact` to it; window `[s, e)` lands on `[int(s * z), int(e * z))`;
//! - the weights are summed over all windows once, every weighted window output is added in window order, and the
//!   sum is divided by the weights at the end; the padding is cropped back with MONAI's `round`.
//!
//! Written here rather than taken from a crate: no Rust crate implements MONAI's inferer, and parity needs its exact
//! order of operations.
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How overlapping windows are blended (MONAI's `BlendMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlendMode {
    /// Every voxel of a window weighs the same: overlaps are plain averages.
    #[default]
    Constant,
    /// Voxels near a window's centre weigh more, so seams fade out.
    Gaussian,
}

/// `SlidingWindowInferer`'s settings, with its defaults (`roi_size` has none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlidingWindowConfig {
    /// The window, in input voxels; a non-positive entry means "the input's whole size along that axis".
    pub roi_size: Vec<i64>,
    #[serde(default = "one")]
    pub sw_batch_size: i64,
    /// Fraction of a window shared with its neighbour, per axis or one for all; in [0, 1).
    #[serde(default = "quarter")]
    pub overlap: Vec<f64>,
    #[serde(default)]
    pub mode: BlendMode,
    /// The Gaussian's sigma as a fraction of the window, per axis or one for all.
    #[serde(default = "eighth")]
    pub sigma_scale: Vec<f64>,
    /// The value the input is padded with where it is smaller than the window.
    #[serde(default)]
    pub cval: f64,
}

fn one() -> i64 {
    1
}
fn quarter() -> Vec<f64> {
    vec![0.25]
}
fn eighth() -> Vec<f64> {
    vec![0.125]
}

impl SlidingWindowConfig {
    pub fn new(roi_size: Vec<i64>) -> Self {
        Self {
            roi_size,
            sw_batch_size: 1,
            overlap: quarter(),
            mode: BlendMode::Constant,
            sigma_scale: eighth(),
            cval: 0.0,
        }
    }

    /// One value per spatial axis, from a single value or one per axis (MONAI's `ensure_tuple_rep`).
    fn per_axis(v: &[f64], n: usize, what: &str) -> Result<Vec<f64>> {
        match v.len() {
            1 => Ok(vec![v[0]; n]),
            k if k == n => Ok(v.to_vec()),
            k => bail!("sliding window: {what} has {k} entries, the input has {n} spatial axes"),
        }
    }

    pub fn validate(&self, spatial_dims: usize) -> Result<()> {
        ensure!(
            self.roi_size.len() == spatial_dims,
            "sliding window: roi_size {:?} has {} entries, the input has {spatial_dims} spatial axes",
            self.roi_size,
            self.roi_size.len()
        );
        ensure!(
            self.sw_batch_size >= 1,
            "sliding window: sw_batch_size must be at least 1, got {}",
            self.sw_batch_size
        );
        for o in Self::per_axis(&self.overlap, spatial_dims, "overlap")? {
            ensure!((0.0..1.0).contains(&o), "sliding window: overlap must be in [0, 1), got {o}");
        }
        for s in Self::per_axis(&self.sigma_scale, spatial_dims, "sigma_scale")? {
            ensure!(s > 0.0, "sliding window: sigma_scale must be positive, got {s}");
        }
        Ok(())
    }
}

/// MONAI's `compute_importance_map` for a window of `size` (float32).
fn importance_map(size: &[i64], mode: BlendMode, sigma_scale: &[f64], device: tch::Device) -> Tensor {
    let map = match mode {
        BlendMode::Constant => Tensor::ones(size, (Kind::Float, device)),
        BlendMode::Gaussian => {
            let mut map: Option<Tensor> = None;
            for (i, (&n, &s)) in size.iter().zip(sigma_scale).enumerate() {
                let sigma = n as f64 * s;
                let half = (n - 1) as f64 / 2.0;
                let x = Tensor::arange_start(-half, half + 1.0, (Kind::Float, device));
                let x = (x.pow_tensor_scalar(2) / (-2.0 * sigma * sigma)).exp();
                map = Some(match map {
                    None => x,
                    // `map.unsqueeze(-1) * x[(None,) * i]`
                    Some(m) => m.unsqueeze(-1) * x.view([&vec![1i64; i][..], &[n]].concat().as_slice()),
                });
            }
            map.expect("at least one spatial axis")
        }
    };
    let min = map.min().double_value(&[]).max(1e-3);
    map.clamp_min(min)
}

/// `[start, end)` per spatial axis.
type Window = Vec<(i64, i64)>;

/// MONAI's `_get_scan_interval` and `dense_patch_slices`: the windows, first axis slowest.
fn windows(image: &[i64], roi: &[i64], overlap: &[f64]) -> Vec<Window> {
    let starts: Vec<Vec<i64>> = (0..image.len())
        .map(|i| {
            let interval =
                if roi[i] == image[i] { roi[i] } else { ((roi[i] as f64 * (1.0 - overlap[i])) as i64).max(1) };
            let num = (image[i] as f64 / interval as f64).ceil() as i64;
            let scan = (0..num).find(|d| d * interval + roi[i] >= image[i]).map_or(1, |d| d + 1);
            (0..scan).map(|idx| idx * interval - (idx * interval + roi[i] - image[i]).max(0)).collect()
        })
        .collect();
    let mut out: Vec<Window> = vec![Vec::new()];
    for (axis, s) in starts.iter().enumerate() {
        out = out
            .into_iter()
            .flat_map(|w| {
                s.iter().map(move |&st| {
                    let mut w = w.clone();
                    w.push((st, st + roi[axis]));
                    w
                })
            })
            .collect();
    }
    out
}

/// Narrows `t` (batch, channels, spatial...) to `w` along the spatial axes.
fn narrow_to(t: &Tensor, w: &[(i64, i64)]) -> Result<Tensor> {
    let mut t = t.shallow_clone();
    for (axis, &(s, e)) in w.iter().enumerate() {
        t = t.f_narrow(2 + axis as i64, s, e - s)?;
    }
    Ok(t)
}

/// Runs `predictor` over `inputs` (batch, channels, spatial...) window by window and blends the results.
pub fn sliding_window_inference(
    inputs: &Tensor,
    cfg: &SlidingWindowConfig,
    mut predictor: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let shape = inputs.size();
    ensure!(shape.len() >= 3, "sliding window: the input must be (batch, channels, spatial...), got shape {shape:?}");
    let nd = shape.len() - 2;
    cfg.validate(nd)?;
    let overlap = SlidingWindowConfig::per_axis(&cfg.overlap, nd, "overlap")?;
    let sigma_scale = SlidingWindowConfig::per_axis(&cfg.sigma_scale, nd, "sigma_scale")?;
    let image_size_: Vec<i64> = shape[2..].to_vec();
    let roi: Vec<i64> = cfg.roi_size.iter().zip(&image_size_).map(|(&r, &s)| if r > 0 { r } else { s }).collect();
    let batch = shape[0];
    let device = inputs.device();
    let compute_kind = inputs.kind();

    // F.pad order: the last axis first, (before, after) each.
    let mut pad = Vec::with_capacity(2 * nd);
    for k in (0..nd).rev() {
        let diff = (roi[k] - image_size_[k]).max(0);
        pad.push(diff / 2);
        pad.push(diff - diff / 2);
    }
    let padded = pad.iter().any(|&p| p > 0);
    let inputs = if padded { inputs.f_pad(pad.as_slice(), "constant", cfg.cval)? } else { inputs.shallow_clone() };
    let image_size: Vec<i64> = inputs.size()[2..].to_vec();

    let slices = windows(&image_size, &roi, &overlap);
    let num_win = slices.len() as i64;
    let total = num_win * batch;
    let weights = importance_map(&roi, cfg.mode, &sigma_scale, device).to_kind(compute_kind);
    let weights = weights.view([&[1i64, 1][..], &roi[..]].concat().as_slice());

    let mut acc: Option<Accumulator> = None;
    let mut start = 0;
    while start < total {
        let range: Vec<i64> = (start..(start + cfg.sw_batch_size).min(total)).collect();
        let parts = range
            .iter()
            .map(|&idx| narrow_to(&inputs.narrow(0, idx / num_win, 1), &slices[(idx % num_win) as usize]))
            .collect::<Result<Vec<_>>>()?;
        let win_data = Tensor::f_cat(&parts, 0)?;
        let out = predictor(&win_data).context("sliding window: the predictor failed on a window")?;
        let os = out.size();
        ensure!(
            os.len() == nd + 2 && os[0] == range.len() as i64,
            "sliding window: the predictor returned shape {os:?} for windows of shape {:?}",
            win_data.size()
        );
        let out = out.f_to_kind(compute_kind)?;
        if acc.is_none() {
            acc = Some(Accumulator::new(&os, &roi, &image_size, &weights, &slices, batch, compute_kind, device)?);
        }
        let acc = acc.as_ref().unwrap();
        ensure!(
            os[2..] == acc.window_out[..],
            "sliding window: the predictor returned shape {os:?}, an earlier window gave spatial size {:?}",
            acc.window_out
        );
        let weighted = out * &acc.weights;
        for (k, &idx) in range.iter().enumerate() {
            let w = &slices[(idx % num_win) as usize];
            let mut dst = narrow_to(&acc.output.narrow(0, idx / num_win, 1), &zoomed(w, acc.zoom.as_deref()))?;
            dst += weighted.narrow(0, k as i64, 1);
        }
        start += cfg.sw_batch_size;
    }
    let acc = acc.context("sliding window: no window was run (empty input?)")?;
    let mut full = acc.output;
    full /= acc.count;
    if !padded {
        return Ok(full);
    }
    // MONAI's crop: zoom from the output over roi_size (exact on padded axes; on the others the start is 0 and an
    // overshooting end is clamped, as Python's slicing does).
    let out_shape = full.size();
    let mut cropped = full;
    for sp in 0..nd {
        let si = nd - sp - 1;
        let z = out_shape[2 + si] as f64 / roi[si] as f64;
        let s = (pad[sp * 2] as f64 * z).round_ties_even() as i64;
        let e = (((pad[sp * 2] + image_size_[si]) as f64) * z).round_ties_even() as i64;
        let e = e.min(out_shape[2 + si]);
        cropped = cropped.f_narrow(2 + si as i64, s, e - s)?;
    }
    Ok(cropped)
}

/// The blended output as it accumulates, made when the first window's output shows its size.
struct Accumulator {
    output: Tensor,
    /// Sum of the weights of every window covering each output voxel.
    count: Tensor,
    /// A window's weights at the output's window size.
    weights: Tensor,
    /// Output over input window size, per axis, when they differ.
    zoom: Option<Vec<f64>>,
    /// The spatial size of a window's output.
    window_out: Vec<i64>,
}

impl Accumulator {
    #[allow(clippy::too_many_arguments)]
    fn new(
        first_out: &[i64],
        roi: &[i64],
        image_size: &[i64],
        weights: &Tensor,
        slices: &[Window],
        batch: i64,
        kind: Kind,
        device: tch::Device,
    ) -> Result<Self> {
        let seg: Vec<i64> = first_out[2..].to_vec();
        let (zoom, weights) = if seg != roi {
            let z: Vec<f64> = seg.iter().zip(roi).map(|(&o, &i)| o as f64 / i as f64).collect();
            let w = match seg.len() {
                2 => weights.f_internal_upsample_nearest_exact2d(seg.as_slice(), None, None)?,
                3 => weights.f_internal_upsample_nearest_exact3d(seg.as_slice(), None, None, None)?,
                1 => weights.f_internal_upsample_nearest_exact1d(seg.as_slice(), None)?,
                n => bail!("sliding window: {n} spatial axes are not supported (1 to 3 are)"),
            };
            (Some(z), w)
        } else {
            (None, weights.shallow_clone())
        };
        let out_spatial: Vec<i64> = match &zoom {
            Some(z) => image_size.iter().zip(z).map(|(&i, &z)| (i as f64 * z) as i64).collect(),
            None => image_size.to_vec(),
        };
        let output =
            Tensor::f_zeros([&[batch, first_out[1]][..], &out_spatial[..]].concat().as_slice(), (kind, device))?;
        let count = Tensor::f_zeros([&[1i64, 1][..], &out_spatial[..]].concat().as_slice(), (kind, device))?;
        for w in slices {
            let mut dst = narrow_to(&count, &zoomed(w, zoom.as_deref()))?;
            dst += &weights;
        }
        Ok(Self { output, count, weights, zoom, window_out: seg })
    }
}

/// A window's place in the output: `[int(s * z), int(e * z))` per axis.
fn zoomed(w: &[(i64, i64)], zoom: Option<&[f64]>) -> Window {
    match zoom {
        None => w.to_vec(),
        Some(z) => w.iter().zip(z).map(|(&(s, e), &z)| ((s as f64 * z) as i64, (e as f64 * z) as i64)).collect(),
    }
}
