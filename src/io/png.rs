//! 8-bit grayscale PNGs as the reference reads and writes them, and grids of them.
use super::atomic;
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;
use tch::{Device, Tensor};

/// Any image as a PNG, atomically.
pub fn save_image(path: &Path, img: &image::DynamicImage) -> Result<()> {
    atomic::write_with(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// A PNG as a `(1, H, W)` float32 tensor, `u8 / 255.0` (a division, as MONAI's
/// `ScaleIntensityRanged` does; multiplying by 1/255 differs in the last bit).
pub fn load_png(path: &Path) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let gray = match img {
        image::DynamicImage::ImageLuma8(g) => g,
        other => bail!("{}: expected an 8-bit grayscale PNG, got {:?}", path.display(), other.color()),
    };
    let (w, h) = gray.dimensions();
    let values: Vec<f32> = gray.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(Tensor::from_slice(&values).view([1, h as i64, w as i64]))
}

/// `images` stacked into one `(B, ...)` batch, each checked against the first: a size that differs is an
/// error naming both files and both sizes (libtorch would panic).
pub fn stack_images(images: &[Tensor], paths: &[&Path]) -> Result<Tensor> {
    ensure!(!images.is_empty() && images.len() == paths.len(), "no images to put in a batch");
    let first = images[0].size();
    for (img, path) in images.iter().zip(paths).skip(1) {
        ensure!(
            img.size() == first,
            "images of different sizes cannot share a batch: {} is {}, {} is {}",
            paths[0].display(),
            image_size(&first),
            path.display(),
            image_size(&img.size())
        );
    }
    Ok(Tensor::f_stack(images, 0)?)
}

/// `HxW` of a `(.., H, W)` image, the way image sizes are usually written.
fn image_size(s: &[i64]) -> String {
    match s {
        [.., h, w] => format!("{h}x{w}"),
        _ => format!("{s:?}"),
    }
}

/// The reference's PNG quantisation of one `(1, H, W)` or `(H, W)` image: clip to [0, 1], ×255,
/// truncate to u8 (`astype(np.uint8)`). Written to a temporary file, then renamed.
pub fn save_png(path: &Path, image: &Tensor) -> Result<()> {
    let img = image.detach().to_device(Device::Cpu).to_kind(tch::Kind::Float);
    let img = match img.dim() {
        2 => img,
        3 => img.squeeze_dim(0),
        n => bail!("save_png: expected (1, H, W) or (H, W), got {n} dimensions ({:?})", img.size()),
    };
    let (h, w) = img.size2()?;
    let values: Vec<f32> = Vec::try_from(img.clamp(0.0, 1.0).flatten(0, -1))?;
    let bytes: Vec<u8> = values.iter().map(|&v| (v * 255.0) as u8).collect();
    let png = image::GrayImage::from_raw(w as u32, h as u32, bytes).context("image buffer size")?;
    save_image(path, &image::DynamicImage::ImageLuma8(png))
}

/// A grid PNG of `(N, 1, H, W)` images in [0, 1] (clipped), `cols` per row: truncated to u8 as
/// the reference saves images. `(N, 1, X, Y, Z)` volumes show their middle slice along Z.
pub fn save_grid(path: &Path, images: &Tensor, cols: i64) -> Result<()> {
    let imgs = images.detach().to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).clamp(0.0, 1.0);
    // A volume batch shows its middle slice along the last (axial, for RAS-ordered NIfTI) axis.
    let imgs = match imgs.size().as_slice() {
        [_, _, _, _, d] => imgs.select(4, d / 2),
        _ => imgs,
    };
    let (n, _, h, w) = imgs.size4()?;
    let cols = cols.clamp(1, n.max(1));
    let rows = (n + cols - 1) / cols;
    let mut canvas = image::GrayImage::new((cols * w) as u32, (rows * h) as u32);
    let values: Vec<f32> = Vec::try_from(imgs.flatten(0, -1))?;
    for i in 0..n {
        let (r, c) = (i / cols, i % cols);
        for y in 0..h {
            for x in 0..w {
                let v = values[(i * h * w + y * w + x) as usize];
                canvas.put_pixel((c * w + x) as u32, (r * h + y) as u32, image::Luma([(v * 255.0) as u8]));
            }
        }
    }
    save_image(path, &image::DynamicImage::ImageLuma8(canvas))
}
