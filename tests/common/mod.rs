//! Shared test helpers.
#![allow(dead_code)]
pub mod run;

use std::path::PathBuf;
use tch::{Kind, Tensor};

/// Fixture root, written by the Python generators (`make fixtures`). Missing fixtures are a
/// failure, never a skip.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("MEDGEN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    assert!(dir.is_dir(), "fixtures not found at {}: run `make fixtures` (or `make test`)", dir.display());
    dir
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    if a.numel() == 0 {
        return 0.0;
    }
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max();
    f64::try_from(d).unwrap()
}

pub fn max_abs(a: &Tensor) -> f64 {
    f64::try_from(a.to_kind(Kind::Double).abs().max()).unwrap()
}

/// Bit-exact equality of dtype, shape and values.
pub fn assert_same(name: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.kind(), b.kind(), "{name}: dtype");
    assert_eq!(a.size(), b.size(), "{name}: shape");
    assert!(a.equal(b), "{name}: values differ");
}
