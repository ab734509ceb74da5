//! MONAI's per-image regression metrics (`PSNRMetric`, `MAEMetric`, `MSEMetric`, MONAI 1.6.1) and the
//! `mean+-std` line the reference prints for them (reference-repo.md §5.4).
//!
//! MONAI reduces each image over channels and pixels (`flatten(start_dim=1).mean(-1)`) in the input's dtype, on
//! `y - y_pred`; these functions do the same and return `(B,)` where MONAI returns `(B, 1)`. All three are symmetric
//! in their arguments.
use anyhow::{ensure, Result};
use std::fmt;
use tch::Tensor;

/// MONAI's `RegressionMetric._check_shape`: equal shapes and a non-batch dimension.
fn check_pair(y_pred: &Tensor, y: &Tensor, what: &str) -> Result<()> {
    ensure!(y_pred.size() == y.size(), "{what}: y_pred and y shapes differ: {:?} and {:?}", y_pred.size(), y.size());
    ensure!(
        y_pred.dim() >= 2,
        "{what}: expected (batch, ...) with a channel or spatial dimension, got {:?}",
        y_pred.size()
    );
    Ok(())
}

/// `compute_mean_error_metrics`: `mean(flatten(f(y - y_pred), 1), -1)`.
fn mean_error(y_pred: &Tensor, y: &Tensor, what: &str, f: impl FnOnce(Tensor) -> Tensor) -> Result<Tensor> {
    check_pair(y_pred, y, what)?;
    Ok(tch::no_grad(|| f(y - y_pred).flatten(1, -1).mean_dim(-1, false, None)))
}

/// `MSEMetric()`: mean squared error per image, `(B,)`.
pub fn mse(y_pred: &Tensor, y: &Tensor) -> Result<Tensor> {
    mean_error(y_pred, y, "MSE", |d| d.pow_tensor_scalar(2.0))
}

/// `MAEMetric()`: mean absolute error per image, `(B,)`.
pub fn mae(y_pred: &Tensor, y: &Tensor) -> Result<Tensor> {
    mean_error(y_pred, y, "MAE", |d| d.abs())
}

/// `PSNRMetric(max_val)`: `20 log10(max_val) - 10 log10(mse)` per image, `(B,)`, in dB. `max_val` is the dynamic
/// range (1 for the reference's [0, 1] images; MONAI has no default). Identical images give +inf, as in MONAI.
pub fn psnr(y_pred: &Tensor, y: &Tensor, max_val: f64) -> Result<Tensor> {
    ensure!(max_val > 0.0, "PSNR: max_val must be positive, got {max_val}");
    let mse = mse(y_pred, y)?;
    // The constant is a Python float; libtorch rounds it to the tensor's dtype in the subtraction.
    Ok(tch::no_grad(|| (mse.log10() * 10i64).rsub_scalar(20.0 * max_val.log10())))
}

/// Mean and population standard deviation (ddof 0) of per-image values, as the reference reports them with
/// `f"{np.mean(list)}+-{np.std(list)}"`. Both use numpy's pairwise summation and `Display` prints Python's float
/// format, so the line is numpy's to the last digit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
    pub count: usize,
}

/// numpy's `pairwise_sum` for float64 (`loops_utils.h.src`): plain accumulation below 8 values, eight interleaved
/// accumulators up to 128, and halving (at a multiple of 8) above. The order matters for the last digits.
fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        a.iter().fold(-0.0, |acc, v| acc + v)
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        for block in a[8..full].chunks_exact(8) {
            for (acc, v) in r.iter_mut().zip(block) {
                *acc += v;
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for v in &a[full..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

impl MeanStd {
    /// `np.mean(values)` and `np.std(values)`.
    pub fn of(values: &[f64]) -> Result<Self> {
        ensure!(!values.is_empty(), "mean and std of an empty list");
        let n = values.len() as f64;
        // np.add.reduce starts from the identity 0.0.
        let mean = (0.0 + pairwise_sum(values)) / n;
        let squares: Vec<f64> = values.iter().map(|v| (v - mean) * (v - mean)).collect();
        let std = ((0.0 + pairwise_sum(&squares)) / n).sqrt();
        Ok(Self { mean, std, count: values.len() })
    }

    /// The values of a `(B,)` or `(B, 1)` metric tensor.
    pub fn of_tensor(values: &Tensor) -> Result<Self> {
        let v = Vec::<f64>::try_from(values.to_kind(tch::Kind::Double).flatten(0, -1))?;
        Self::of(&v)
    }
}

/// A float as Python's `repr` / f-string prints it: the shortest round-trip digits (as Rust's), but `26.0` rather
/// than `26`, and scientific notation (`1e-05`, `1.5e+16`) below 1e-4 and from 1e16 on.
pub fn python_float(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let a = v.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{v:e}");
        let (mantissa, exp) = s.split_once('e').expect("{:e} has an exponent");
        let exp: i32 = exp.parse().expect("integer exponent");
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{v}");
    if s.contains('.') {
        s
    } else {
        s + ".0"
    }
}

impl fmt::Display for MeanStd {
    /// `mean+-std` with Python's float formatting: the reference's line, digit for digit.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+-{}", python_float(self.mean), python_float(self.std))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn population_std_and_format() {
        let m = MeanStd::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(m.mean, 2.5);
        assert_eq!(m.std, 1.25f64.sqrt());
        assert_eq!(m.to_string(), format!("2.5+-{}", 1.25f64.sqrt()));
        assert_eq!(MeanStd::of(&[26.0]).unwrap().to_string(), "26.0+-0.0");
    }

    #[test]
    fn floats_print_as_python_does() {
        for (v, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456789.0, "123456789.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (2.5e100, "2.5e+100"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(python_float(v), want, "{v:e}");
        }
    }

    #[test]
    fn pairwise_sum_matches_plain_sum_on_exact_values() {
        let v: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        assert_eq!(pairwise_sum(&v), 499500.0);
    }
}
