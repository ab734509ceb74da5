//! Volumes as the 3-D networks see them, for training and as ControlNet input: a NIfTI file read whole,
//! its intensities mapped to [0, 1] as the model-zoo's 3-D generative bundles prepare their training data
//! (`ScaleIntensityRangePercentilesd(lower=0, upper=99.5, b_min=0, b_max=1)`), clipped to [0, 1] because the
//! decoder's targets live there. No resampling or cropping: the volumes of a list share one shape, which the
//! autoencoder can reconstruct (checked by the training step, naming the shapes).
use crate::io::volume::read_volume;
use anyhow::{ensure, Result};
use ndarray::Array3;
use std::path::Path;
use tch::Tensor;

/// The percentiles (of all voxels) mapped to 0 and 1.
pub const LOWER_PERCENTILE: f64 = 0.0;
pub const UPPER_PERCENTILE: f64 = 99.5;

/// `np.percentile(values, q)` with its default linear interpolation; `values` is reordered.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    let n = values.len();
    let pos = q / 100.0 * (n - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let (_, &mut a, rest) = values.select_nth_unstable_by(lo, f64::total_cmp);
    if frac == 0.0 || rest.is_empty() {
        return a;
    }
    // The next order statistic is the smallest of what lies above the lo-th.
    let b = rest.iter().copied().fold(f64::INFINITY, f64::min);
    a + (b - a) * frac
}

/// The [0, 1] intensities of `data` (see the module docs); a volume without contrast (its percentiles equal) is an
/// error naming `what`, as it carries nothing to learn or to condition on.
pub fn normalize(data: &Array3<f64>, what: &str) -> Result<Array3<f32>> {
    ensure!(!data.is_empty(), "{what}: the volume is empty");
    ensure!(data.iter().all(|v| v.is_finite()), "{what}: the volume holds NaN or infinite values");
    let mut values: Vec<f64> = data.iter().copied().collect();
    let lo = percentile(&mut values, LOWER_PERCENTILE);
    let hi = percentile(&mut values, UPPER_PERCENTILE);
    ensure!(hi > lo, "{what}: no contrast (the {LOWER_PERCENTILE} and {UPPER_PERCENTILE} percentiles are both {lo})");
    Ok(data.mapv(|v| ((v - lo) / (hi - lo)).clamp(0.0, 1.0) as f32))
}

/// `(X, Y, Z)` float32 as a `(1, X, Y, Z)` tensor (one channel), array order kept.
pub fn to_tensor(v: &Array3<f32>) -> Result<Tensor> {
    let shape: Vec<i64> = std::iter::once(1).chain(v.shape().iter().map(|&d| d as i64)).collect();
    let flat: Vec<f32> = v.iter().copied().collect();
    Ok(Tensor::f_from_slice(&flat)?.f_view(shape.as_slice())?)
}

/// A NIfTI volume as a normalised `(1, X, Y, Z)` float32 tensor.
pub fn load_volume(path: &Path) -> Result<Tensor> {
    let v = read_volume(path)?;
    to_tensor(&normalize(&v.data, &path.display().to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_numpy() {
        let mut v: Vec<f64> = (0..11).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.0), 0.0);
        assert_eq!(percentile(&mut v, 100.0), 10.0);
        assert!((percentile(&mut v, 99.5) - 9.95).abs() < 1e-12);
        assert!((percentile(&mut v, 25.0) - 2.5).abs() < 1e-12);
    }

    #[test]
    fn normalisation_maps_the_range_and_refuses_flat_volumes() {
        let data = Array3::from_shape_fn((10, 10, 2), |(i, j, k)| (i * 20 + j * 2 + k) as f64 - 5.0);
        let n = normalize(&data, "v").unwrap();
        assert_eq!(n[[0, 0, 0]], 0.0);
        assert_eq!(n[[9, 9, 1]], 1.0);
        assert!(n.iter().all(|v| (0.0..=1.0).contains(v)));
        let e = normalize(&Array3::zeros((3, 3, 3)), "flat.nii").unwrap_err();
        assert!(format!("{e}").starts_with("flat.nii: no contrast"), "{e}");
    }
}
