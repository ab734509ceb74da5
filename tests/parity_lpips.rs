//! LPIPS (lpips 0.1.4) and MONAI 1.6.1 `PerceptualLoss` parity for alex, vgg and squeeze, on the fixtures of
//! `tests/gen_lpips_fixtures.py`: the real v0.1 lin heads read straight from the lpips wheel's legacy `.pth` files,
//! a random torchvision trunk (no ImageNet weights ship offline) read from the `torch.save` file Python wrote.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::checkpoint::StateDict;
use medgen::losses::perceptual::{PerceptualLoss, PerceptualLossConfig, MISSING_BACKBONE};
use medgen::nets::lpips::{wheel_lin_weights, Lpips, LpipsNet};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Relative to the largest reference magnitude. fp32 CPU, one thread on both sides, same libtorch.
const REL_TOL: f64 = 1e-5;

#[derive(Default)]
struct Table {
    rows: Vec<String>,
    failures: Vec<String>,
}

impl Table {
    fn check(&mut self, case: &str, what: &str, got: &Tensor, want: &Tensor) {
        let err = max_abs_diff(got, want);
        let scale = max_abs(want);
        let rel = err / scale.max(f64::MIN_POSITIVE);
        self.rows.push(format!("{case:8} {what:34} max_abs_err {err:.3e}  max|ref| {scale:.3e}  rel {rel:.3e}"));
        if rel > REL_TOL || rel.is_nan() || scale == 0.0 {
            self.failures.push(format!("{case} {what}: relative error {rel:e} > {REL_TOL:e} (max |ref| {scale:e})"));
        }
    }

    fn require(&mut self, case: &str, what: &str, ok: bool, detail: String) {
        self.rows.push(format!("{case:8} {what:34} {}", if ok { "ok" } else { "FAILED" }));
        if !ok {
            self.failures.push(format!("{case} {what}: {detail}"));
        }
    }
}

struct Case {
    net: LpipsNet,
    dir: PathBuf,
    lin_weights: PathBuf,
}

fn cases() -> Vec<Case> {
    let root = fixtures().join("lpips");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let cases: Vec<Case> = manifest
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            net: c["net"].as_str().unwrap().parse().unwrap(),
            dir: root.join(c["dir"].as_str().unwrap()),
            lin_weights: PathBuf::from(c["lin_weights"].as_str().unwrap()),
        })
        .collect();
    let nets: Vec<LpipsNet> = cases.iter().map(|c| c.net).collect();
    assert_eq!(nets, LpipsNet::ALL, "expected one fixture per network");
    cases
}

fn leaf(t: &Tensor) -> Tensor {
    t.copy().set_requires_grad(true)
}

#[test]
fn lpips_and_perceptual_loss_match_lpips_and_monai() {
    tch::set_num_threads(1);
    let mut table = Table::default();
    for c in cases() {
        let case = c.net.name();
        let io = StateDict::load(&c.dir.join("io.safetensors"), None).unwrap();
        let t = |k: &str| io.get(k).unwrap_or_else(|| panic!("{case}: fixture lacks {k}")).shallow_clone();
        let backbone = c.dir.join("backbone.pt");
        let lpips = Lpips::load(c.net, &c.lin_weights, &backbone, Device::Cpu).unwrap();
        let trainable: Vec<String> =
            lpips.variables().into_iter().filter(|(_, v)| v.requires_grad()).map(|(k, _)| k).collect();
        table.require(case, "network frozen", trainable.is_empty(), format!("weights requiring grad: {trainable:?}"));

        // LPIPS itself, 3-channel images in [-1, 1], gradients w.r.t. both images.
        let (x0, x1) = (leaf(&t("lpips_in0")), leaf(&t("lpips_in1")));
        let layers = lpips.forward_layers(&x0, &x1).unwrap();
        assert_eq!(layers.len(), c.net.channels().len());
        for (k, r) in layers.iter().enumerate() {
            table.check(case, &format!("lpips layer {k}"), r, &t(&format!("lpips_layer{k}")));
        }
        let val = lpips.forward(&x0, &x1).unwrap();
        table.check(case, "lpips value (2,1,1,1)", &val, &t("lpips_value"));
        val.sum(None::<Kind>).backward();
        table.check(case, "lpips d/d in0", &x0.grad(), &t("lpips_grad_in0"));
        table.check(case, "lpips d/d in1", &x1.grad(), &t("lpips_grad_in1"));

        // An odd size, where the pools' rounding (ceil for squeezenet) matters.
        let z0 = leaf(&t("odd_in0"));
        let odd = lpips.forward(&z0, &t("odd_in1")).unwrap();
        table.check(case, "lpips value 1x3x66x93", &odd, &t("odd_value"));
        odd.sum(None::<Kind>).backward();
        table.check(case, "lpips 1x3x66x93 d/d in0", &z0.grad(), &t("odd_grad_in0"));

        // MONAI's PerceptualLoss as the reference training calls it: 1-channel [0, 1] images, 160x224.
        let cfg = PerceptualLossConfig {
            network_type: c.net,
            lin_weights: Some(c.lin_weights.clone()),
            backbone_weights: Some(backbone.clone()),
            ..PerceptualLossConfig::default()
        };
        let loss_fn = PerceptualLoss::new(&cfg, Device::Cpu).unwrap();
        let (x, y) = (leaf(&t("monai_input")), t("monai_target"));
        let loss = loss_fn.forward(&x, &y).unwrap();
        assert_eq!(loss.size(), Vec::<i64>::new(), "{case}: the loss is a scalar");
        table.check(case, "PerceptualLoss value", &loss, &t("monai_loss"));
        loss.backward();
        table.check(case, "PerceptualLoss d/d input", &x.grad(), &t("monai_grad_input"));

        // Volumes: the 2.5-D loss (slices along each axis, a seeded random 30 % of them), value and gradient.
        let cfg3 = PerceptualLossConfig { spatial_dims: 3, fake_3d_ratio: 0.3, ..cfg.clone() };
        let loss3_fn = PerceptualLoss::new(&cfg3, Device::Cpu).unwrap();
        let v = leaf(&t("fake3d_input"));
        tch::manual_seed(99);
        let l3 = loss3_fn.forward(&v, &t("fake3d_target")).unwrap();
        table.check(case, "PerceptualLoss 2.5-D value", &l3, &t("fake3d_loss"));
        l3.backward();
        table.check(case, "PerceptualLoss 2.5-D d/d input", &v.grad(), &t("fake3d_grad_input"));
        // Other slices (another seed) give another value: the draws matter, so the check above tests them.
        tch::manual_seed(100);
        let other = f64::try_from(loss3_fn.forward(&v.detach(), &t("fake3d_target")).unwrap()).unwrap();
        let want3 = f64::try_from(t("fake3d_loss")).unwrap();
        table.require(case, "2.5-D slices are drawn", (other - want3).abs() > 1e-7, format!("{other} == {want3}"));

        let _g = tch::no_grad_guard();
        // Quirk 1: no [-1, 1] rescale. The fixture must be able to tell: the rescaled loss is far off.
        let normalized = f64::try_from(t("monai_loss_if_normalized")).unwrap();
        let got = f64::try_from(&loss).unwrap();
        table.require(
            case,
            "no [-1,1] rescale (quirk)",
            (got - normalized).abs() > 1e-3 * normalized.abs(),
            format!("loss {got} equals the rescaled one {normalized}"),
        );
        // Quirk 2: one channel broadcast to three by the scaling, bit-identical to repeating it.
        let repeated = loss_fn.forward(&x.repeat([1, 3, 1, 1]), &y.repeat([1, 3, 1, 1])).unwrap();
        table.require(
            case,
            "1-channel broadcast == repeat",
            repeated.equal(&loss),
            format!("{repeated:?} vs {loss:?}"),
        );
        // The whole lpips.LPIPS state dict (`net.sliceK.N.*`, `lin*`, `lins.*` aliases) serves for both files.
        let full = StateDict::load(&c.dir.join("lpips_full.pt"), None).unwrap();
        let from_full = Lpips::with_backbone_weights(c.net, &full, &full, Device::Cpu).unwrap();
        let v = from_full.forward(&t("lpips_in0"), &t("lpips_in1")).unwrap();
        table.require(
            case,
            "lpips.LPIPS state dict as weights",
            v.equal(&t("lpips_value")),
            format!("notes {:?}: {v:?}", from_full.notes),
        );
        if c.net == LpipsNet::Squeeze {
            // The whole torchvision checkpoint: its ImageNet classifier is ignored, and said so.
            let said = lpips.notes.iter().any(|n| n.contains("classifier"));
            table.require(case, "classifier.* ignored, noted", said, format!("notes {:?}", lpips.notes));
        }
    }
    println!("{}", table.rows.join("\n"));
    assert!(table.failures.is_empty(), "parity failures:\n{}", table.failures.join("\n"));
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn missing_backbone_is_an_error() {
    // The reference config's `perceptual_network.params`, as it is.
    let cfg: PerceptualLossConfig = serde_json::from_str(r#"{"spatial_dims": 2, "network_type": "squeeze"}"#).unwrap();
    assert_eq!(cfg.network_type, LpipsNet::Squeeze);
    let e = err_text(PerceptualLoss::new(&cfg, Device::Cpu));
    assert!(e.contains(MISSING_BACKBONE), "{e}");
    assert!(e.contains("squeezenet1_1-b8a52dc0.pth"), "names the file to get: {e}");
    // Even with the lin heads there, no trunk means no loss.
    let lin = cases().into_iter().find(|c| c.net == LpipsNet::Squeeze).unwrap().lin_weights;
    let e = err_text(PerceptualLoss::new(&PerceptualLossConfig { lin_weights: Some(lin.clone()), ..cfg }, Device::Cpu));
    assert!(e.contains(MISSING_BACKBONE), "{e}");
    // A backbone path that is not there names the file.
    let absent = Path::new("/nonexistent/squeezenet1_1-b8a52dc0.pth");
    let e = err_text(Lpips::load(LpipsNet::Squeeze, &lin, absent, Device::Cpu));
    assert!(e.contains("backbone") && e.contains(&absent.display().to_string()), "{e}");
}

#[test]
fn config_is_checked() {
    let e =
        serde_json::from_str::<PerceptualLossConfig>(r#"{"network_type": "squeeze", "is_fake_3d": true, "colour": 1}"#)
            .unwrap_err()
            .to_string();
    assert!(e.contains("colour"), "{e}");
    let e = serde_json::from_str::<PerceptualLossConfig>(r#"{"network_type": "resnet50"}"#).unwrap_err().to_string();
    assert!(e.contains("resnet50"), "{e}");
    let cfg =
        PerceptualLossConfig { spatial_dims: 3, is_fake_3d: false, ..PerceptualLossConfig::new(LpipsNet::Squeeze) };
    let e = err_text(PerceptualLoss::new(&cfg, Device::Cpu));
    assert!(e.contains("spatial_dims 3") && e.contains("MedicalNet"), "{e}");
    let cfg = PerceptualLossConfig { spatial_dims: 4, ..PerceptualLossConfig::new(LpipsNet::Squeeze) };
    assert!(err_text(PerceptualLoss::new(&cfg, Device::Cpu)).contains("spatial_dims must be 2 or 3"));
    assert_eq!("VGG".parse::<LpipsNet>().unwrap(), LpipsNet::Vgg, "MONAI lower-cases network_type");
}

#[test]
fn wrong_weights_are_errors_naming_keys() {
    let cases = cases();
    let by = |n: LpipsNet| cases.iter().find(|c| c.net == n).unwrap();
    let (alex, squeeze) = (by(LpipsNet::Alex), by(LpipsNet::Squeeze));
    // An alexnet trunk for squeeze: every mismatch named, with the file.
    let alex_backbone = alex.dir.join("backbone.pt");
    let e = err_text(Lpips::load(LpipsNet::Squeeze, &squeeze.lin_weights, &alex_backbone, Device::Cpu));
    for needle in ["missing key features.3.squeeze.weight", "unexpected key features.3.weight", "squeezenet1_1"] {
        assert!(e.contains(needle), "lacks {needle:?}: {e}");
    }
    assert!(e.contains(&alex_backbone.display().to_string()), "names the file: {e}");
    // alex heads for squeeze: lin5/lin6 missing, shapes differ.
    let e = err_text(Lpips::load(LpipsNet::Squeeze, &alex.lin_weights, &squeeze.dir.join("backbone.pt"), Device::Cpu));
    assert!(
        e.contains("missing key lin5.model.1.weight") && e.contains("shape mismatch for lin2.model.1.weight"),
        "{e}"
    );
    // A torchvision file given as the lin heads.
    let e = err_text(Lpips::load(LpipsNet::Alex, &alex_backbone, &alex_backbone, Device::Cpu));
    assert!(e.contains("missing key lin0.model.1.weight") && e.contains("lin heads"), "{e}");
    // Inputs LPIPS cannot take are errors, not panics.
    let lpips = Lpips::load(LpipsNet::Alex, &alex.lin_weights, &alex_backbone, Device::Cpu).unwrap();
    let img = |c: i64, h: i64| Tensor::zeros([1, c, h, h], (Kind::Float, Device::Cpu));
    assert!(err_text(lpips.forward(&img(2, 64), &img(2, 64))).contains("2 channels"));
    assert!(err_text(lpips.forward(&img(3, 64), &img(3, 32))).contains("differ"));
    assert!(err_text(lpips.forward(&img(3, 16), &img(3, 16))).contains("[1, 3, 16, 16]"));
    let loss = PerceptualLoss::from_lpips(lpips);
    assert!(err_text(loss.forward(&img(1, 64), &img(3, 64))).contains("differing shape"));
}

#[test]
fn wheel_lin_weights_are_found_in_the_venv() {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv");
    for c in cases() {
        let found = wheel_lin_weights(&venv, c.net).unwrap();
        assert_eq!(found.canonicalize().unwrap(), c.lin_weights.canonicalize().unwrap());
    }
    let e = err_text(wheel_lin_weights(Path::new("/nonexistent-venv"), LpipsNet::Vgg));
    assert!(e.contains("/nonexistent-venv/lib") && e.contains("weights/v0.1/vgg.pth"), "{e}");
}
