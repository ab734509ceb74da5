//! RadImageNet ResNet50 (the FID feature network) parity with the hub model's architecture in PyTorch, on the fixtures
//! of `tests/gen_resnet_fixtures.py`: random weights saved with torch.save and read by medgen's own loader, the
//! reference's preprocessing and spatial mean, and the loader's errors for checkpoints that do not fit.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::StateDict;
use medgen::nets::radimagenet_resnet50::{radimagenet_features, radimagenet_preprocess, RadImageNetResNet50};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Relative to the largest reference value. fp32 CPU, one thread on both sides, the same libtorch.
const REL_TOL: f64 = 1e-5;

fn check(failures: &mut Vec<String>, what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let err = max_abs_diff(got, want);
    let scale = max_abs(want);
    let rel = err / scale;
    println!("{what:16} max_abs_err {err:.3e}  max |ref| {scale:.3e}  relative {rel:.3e} (tol {REL_TOL:.0e})");
    if rel > REL_TOL || rel.is_nan() {
        failures.push(format!("{what}: relative error {rel:e} > {REL_TOL:e}"));
    }
}

fn state_dict() -> StateDict {
    StateDict::load(&fixtures().join("resnet/state_dict.pt"), None).unwrap()
}

#[test]
fn radimagenet_resnet50_matches_pytorch() {
    tch::set_num_threads(1);
    let root = fixtures().join("resnet");
    let loaded = RadImageNetResNet50::from_state_dict(state_dict(), Device::Cpu).unwrap();
    assert_eq!(loaded.report.copied.len(), 371, "every entry of the hub's state dict is loaded");
    let net = &loaded.model;
    let io = StateDict::load(&root.join("io.safetensors"), None).unwrap();
    let t = |k: &str| io.get(k).unwrap_or_else(|| panic!("fixture lacks {k}")).shallow_clone();
    let mut failures = Vec::new();

    let start = std::time::Instant::now();
    let feats = radimagenet_features(net, &t("images")).unwrap();
    println!("features of 2 images 160x224 in {:.2} s (1 thread)", start.elapsed().as_secs_f64());
    assert_eq!(feats.kind(), Kind::Float);
    assert!(!feats.requires_grad());
    check(&mut failures, "features", &feats, &t("features"));
    let layer4 = tch::no_grad(|| net.forward(&radimagenet_preprocess(&t("images")).unwrap()).unwrap());
    check(&mut failures, "layer4", &layer4, &t("layer4"));
    check(&mut failures, "odd_features", &radimagenet_features(net, &t("odd_images")).unwrap(), &t("odd_features"));
    let raw = tch::no_grad(|| net.forward(&t("raw_input")).unwrap());
    check(&mut failures, "raw_layer4", &raw, &t("raw_layer4"));
    assert!(failures.is_empty(), "{failures:#?}");

    // The preprocessing itself: BGR order, channel k minus [0.406, 0.456, 0.485][k], no std division.
    let img = Tensor::from_slice(&[0.0f32, 0.5, 1.0, 0.25]).view([1, 1, 2, 2]);
    let pre = radimagenet_preprocess(&img).unwrap();
    for (c, mean) in [0.406f32, 0.456, 0.485].into_iter().enumerate() {
        let want = &img.get(0).get(0) - mean as f64;
        assert!(pre.get(0).get(c as i64).equal(&want.to_kind(Kind::Float)), "channel {c}");
    }
    assert!(format!("{:#}", radimagenet_features(net, &t("raw_input")).unwrap_err()).contains("[1, 3, 64, 96]"));

    // What `medgen convert` would write loads back to the same network.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("radimagenet_resnet50.safetensors");
    loaded.state_dict.save_safetensors(&path, &BTreeMap::new()).unwrap();
    let again = RadImageNetResNet50::load(&path, Device::Cpu).unwrap();
    let odd = t("odd_images");
    let (a, b) = (radimagenet_features(&again.model, &odd).unwrap(), radimagenet_features(net, &odd).unwrap());
    assert!(a.equal(&b), "the safetensors round trip changes the features");
}

#[test]
fn checkpoints_that_do_not_fit_are_errors_naming_the_key() {
    let err = |sd: StateDict| match RadImageNetResNet50::from_state_dict(sd, Device::Cpu) {
        Ok(_) => panic!("the checkpoint loaded"),
        Err(e) => format!("{e:#}"),
    };

    let mut sd = state_dict();
    sd.insert("layer3.2.conv2.weight", Tensor::zeros([256, 256, 1, 1], (Kind::Float, Device::Cpu)));
    let e = err(sd);
    println!("wrong shape: {e}");
    assert!(
        e.contains("layer3.2.conv2.weight") && e.contains("[256, 256, 3, 3]") && e.contains("[256, 256, 1, 1]"),
        "{e}"
    );

    let mut sd = state_dict();
    sd.remove("layer4.0.downsample.1.running_var");
    sd.insert("fc.weight", Tensor::zeros([1000, 2048], (Kind::Float, Device::Cpu)));
    let e = err(sd);
    assert!(e.contains("missing key layer4.0.downsample.1.running_var (model shape [2048])"), "{e}");
    assert!(e.contains("unexpected key fc.weight"), "{e}");

    let mut sd = state_dict();
    sd.insert("bn1.num_batches_tracked", Tensor::zeros([0i64; 0], (Kind::Float, Device::Cpu)));
    assert!(err(sd).contains("dtype mismatch for bn1.num_batches_tracked"));
}

/// The FID batch of the reference (16 images, 160x224) at the default thread count:
/// `cargo test --release --test parity_resnet -- --ignored --nocapture`.
#[test]
#[ignore]
fn time_16_images() {
    let loaded = RadImageNetResNet50::from_state_dict(state_dict(), Device::Cpu).unwrap();
    let x = Tensor::rand([16, 1, 160, 224], (Kind::Float, Device::Cpu));
    let _ = radimagenet_features(&loaded.model, &x.narrow(0, 0, 2)).unwrap();
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let f = radimagenet_features(&loaded.model, &x).unwrap();
        println!(
            "16 images 160x224: {:.2} s ({} threads), {:?}",
            start.elapsed().as_secs_f64(),
            tch::get_num_threads(),
            f.size()
        );
    }
}
