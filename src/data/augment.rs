//! The reference training augmentations (reference-repo.md §1.4, MONAI 1.2 semantics), applied
//! with one random draw to every image of a sample so that a FLAIR/T1w pair stays aligned:
//! `RandFlipd(axis 0)`, `RandAffined(translate, scale; bilinear, reflection)`,
//! `RandShiftIntensityd`, `RandAdjustContrastd`, then the two thresholds that clamp to [0, 1].
//!
//! The deterministic transforms are computed as MONAI computes them (torch `grid_sample` on
//! MONAI's centred grid, its contrast formula), so given the same parameters the images are
//! MONAI's; the random parameters come from medgen's own seeded generator.
use anyhow::Result;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Probabilities and ranges, named after the MONAI arguments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    pub flip_prob: f64,
    pub affine_prob: f64,
    /// Shift in pixels, uniform in (-t, t) per axis.
    pub translate_range: f64,
    /// Scale factor uniform in (1 - s, 1 + s) per axis (anisotropic).
    pub scale_range: f64,
    pub shift_prob: f64,
    /// Intensity offset uniform in (-o, o).
    pub shift_offsets: f64,
    pub contrast_prob: f64,
    pub gamma_min: f64,
    pub gamma_max: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self::autoencoder()
    }
}

impl AugmentConfig {
    /// The AutoencoderKL stage's transforms.
    pub fn autoencoder() -> Self {
        Self {
            flip_prob: 0.5,
            affine_prob: 0.5,
            translate_range: 2.0,
            scale_range: 0.05,
            shift_prob: 0.1,
            shift_offsets: 0.05,
            contrast_prob: 0.1,
            gamma_min: 0.97,
            gamma_max: 1.03,
        }
    }

    /// The LDM and ControlNet stages': a smaller, rarer affine.
    pub fn diffusion() -> Self {
        Self { affine_prob: 0.25, scale_range: 0.01, ..Self::autoencoder() }
    }

    /// Draws the parameters of one sample, transform by transform as MONAI's `Compose` does
    /// (each draws whether it applies, then its parameters).
    pub fn draw(&self, rng: &mut impl Rng) -> AugmentParams {
        let mut p = AugmentParams { flip: rng.random::<f64>() < self.flip_prob, ..Default::default() };
        if rng.random::<f64>() < self.affine_prob {
            let t = self.translate_range;
            let s = self.scale_range;
            let translate = [rng.random_range(-t..=t), rng.random_range(-t..=t)];
            let scale = [1.0 + rng.random_range(-s..=s), 1.0 + rng.random_range(-s..=s)];
            p.affine = Some(Affine { translate, scale });
        }
        if rng.random::<f64>() < self.shift_prob {
            p.shift = Some(rng.random_range(-self.shift_offsets..=self.shift_offsets));
        }
        if rng.random::<f64>() < self.contrast_prob {
            p.gamma = Some(rng.random_range(self.gamma_min..=self.gamma_max));
        }
        p
    }
}

/// Scale then translate, about the image centre, per spatial axis (rows, columns).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub translate: [f64; 2],
    pub scale: [f64; 2],
}

/// One sample's draw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AugmentParams {
    pub flip: bool,
    pub affine: Option<Affine>,
    pub shift: Option<f64>,
    pub gamma: Option<f64>,
}

impl AugmentParams {
    /// Applies the draw to a `(1, H, W)` float32 image.
    pub fn apply(&self, img: &Tensor) -> Result<Tensor> {
        let mut x = img.shallow_clone();
        if self.flip {
            x = x.flip([1]);
        }
        if let Some(a) = &self.affine {
            x = affine(&x, a)?;
        }
        if let Some(o) = self.shift {
            x = &x + o;
        }
        if let Some(g) = self.gamma {
            x = adjust_contrast(&x, g)?;
        }
        // ThresholdIntensityd(1, above=False, cval=1) then (0, above=True, cval=0).
        Ok(x.clamp(0.0, 1.0))
    }
}

/// MONAI `Affine(scale_params, translate_params, mode="bilinear", padding_mode="reflection")`
/// for a `(C, H, W)` image: output pixel centres in MONAI's centred coordinates go through
/// `x_in = scale * x_out + translate`, normalised by `2 / size` for `grid_sample` with
/// `align_corners=False`.
pub fn affine(img: &Tensor, a: &Affine) -> Result<Tensor> {
    let (_, h, w) = img.size3()?;
    let opts = (Kind::Float, img.device());
    let centred = |n: i64| Tensor::arange(n, opts) - (n - 1) as f64 / 2.0;
    let rows = (centred(h) * a.scale[0] + a.translate[0]) * (2.0 / h.max(2) as f64);
    let cols = (centred(w) * a.scale[1] + a.translate[1]) * (2.0 / w.max(2) as f64);
    // grid_sample takes (x, y) = (column, row) in the last dimension.
    let grid = Tensor::stack(&[cols.view([1, w]).expand([h, w], false), rows.view([h, 1]).expand([h, w], false)], -1);
    let out = Tensor::grid_sampler_2d(&img.unsqueeze(0), &grid.unsqueeze(0), 0, 2, false);
    Ok(out.squeeze_dim(0))
}

/// MONAI `AdjustContrast(gamma)`: `((x - min) / (range + 1e-7)) ** gamma * range + min`.
pub fn adjust_contrast(img: &Tensor, gamma: f64) -> Result<Tensor> {
    let min = img.min();
    let range = img.max() - &min;
    // MONAI divides by `float(range + epsilon)`: the sum in float32, then a double.
    let denom = f64::try_from(&range + 1e-7)?;
    Ok(((img - &min) / denom).pow_tensor_scalar(gamma) * &range + &min)
}
