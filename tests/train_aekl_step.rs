//! AutoencoderKL stage parity: 5 steps of the reference generator + discriminator loop (perceptual
//! LPIPS with a random squeeze backbone and the wheel's lin heads; adversarial loss from step 1)
//! against MONAI (tests/gen_train_aekl_fixtures.py): the logged losses and every weight and
//! BatchNorm statistic afterwards.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::amp::Precision;
use medgen::checkpoint::{load_model, load_strict, StateDict};
use medgen::losses::adversarial::PatchAdversarialLoss;
use medgen::losses::perceptual::PerceptualLoss;
use medgen::nets::lpips::{Lpips, LpipsNet};
use medgen::nets::patch_discriminator::{PatchDiscriminator, PatchDiscriminatorConfig};
use medgen::nets::{AutoencoderKL, AutoencoderKLConfig};
use medgen::train::aekl::{aekl_step, AeklLossWeights, AeklModels, AeklOptimizers};
use medgen::train::grad_scaler::GradScaler;
use medgen::train::optim::{Adam, AdamConfig};
use serde_json::Value;
use std::path::Path;
use tch::nn::VarStore;
use tch::Device;

const REL_TOL: f64 = 1e-5;

/// The trainable variables in PyTorch's `parameters()` order: the clipping norm sums in that order.
fn params_in_order(vs: &VarStore, names: &Value) -> Vec<(String, tch::Tensor)> {
    let vars = vs.variables();
    names
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let n = n.as_str().unwrap();
            (n.to_string(), vars.get(n).unwrap_or_else(|| panic!("no variable {n}")).shallow_clone())
        })
        .collect()
}

fn compare(what: &str, vs: &VarStore, want: &StateDict) -> f64 {
    let mut worst = (0.0f64, String::new());
    for (k, v) in vs.variables() {
        let w = want.get(&k).unwrap_or_else(|| panic!("{what}: {k} not in the reference"));
        let rel = max_abs_diff(&v, w) / max_abs(w).max(1e-12);
        if rel > worst.0 {
            worst = (rel, k);
        }
    }
    println!("{what}: worst relative error {:.3e} ({})", worst.0, worst.1);
    assert!(worst.0 <= REL_TOL, "{what}: {} differs by {:e} relative", worst.1, worst.0);
    worst.0
}

#[test]
fn aekl_stage_steps_match_monai() {
    tch::set_num_threads(1);
    let root = fixtures().join("train_aekl");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let load = |f: &str| StateDict::load(&root.join(f), None).unwrap();
    let ae_cfg: AutoencoderKLConfig = serde_json::from_value(m["aekl"].clone()).unwrap();
    let ae = load_model(load("aekl_init.pt"), Device::Cpu, |p, g| AutoencoderKL::new(p, &ae_cfg, g)).unwrap();
    let d_cfg: PatchDiscriminatorConfig = serde_json::from_value(m["discriminator"].clone()).unwrap();
    let d_vs = VarStore::new(Device::Cpu);
    let disc = PatchDiscriminator::new(&d_vs.root(), &d_cfg).unwrap();
    load_strict(&d_vs, &load("disc_init.pt")).unwrap();
    let lin = Path::new(m["lin_weights"].as_str().unwrap());
    let lpips = Lpips::load(LpipsNet::Squeeze, lin, &root.join("lpips_squeeze.pt"), Device::Cpu).unwrap();
    let perceptual = PerceptualLoss::from_lpips(lpips);
    let adversarial = PatchAdversarialLoss::reference();
    let models = AeklModels {
        autoencoder: &ae.model,
        discriminator: &disc,
        perceptual: Some(&perceptual),
        adversarial: &adversarial,
    };
    let w: AeklLossWeights = serde_json::from_value(m["weights"].clone()).unwrap();
    let opt_g =
        Adam::new(AdamConfig::adam(m["lr_g"].as_f64().unwrap()), params_in_order(&ae.vs, &m["aekl_param_order"]))
            .unwrap();
    let opt_d =
        Adam::new(AdamConfig::adam(m["lr_d"].as_f64().unwrap()), params_in_order(&d_vs, &m["disc_param_order"]))
            .unwrap();
    let mut opts = AeklOptimizers {
        g: opt_g,
        d: opt_d,
        scaler_g: GradScaler::for_precision(Precision::Fp32).unwrap(),
        scaler_d: GradScaler::for_precision(Precision::Fp32).unwrap(),
    };
    let draws = load("draws.safetensors");
    for (s, want) in m["losses"].as_array().unwrap().iter().enumerate() {
        let d = |k: &str| draws.get(&format!("{k}.{s}")).unwrap().shallow_clone();
        let adv = want["adversarial"].as_bool().unwrap();
        let got =
            aekl_step(&models, &mut opts, Precision::Fp32, &d("images"), &d("eps"), &w, adv).unwrap().read().unwrap();
        for (name, g) in [
            ("loss", got.loss),
            ("l1", got.l1),
            ("p_loss", got.p_loss),
            ("kl", got.kl),
            ("g_adv", got.g_adv),
            ("d_loss", got.d_loss),
        ] {
            let wv = want[name].as_f64().unwrap();
            println!("step {s} {name:7} medgen {g:.8}  MONAI {wv:.8}");
            assert!((g - wv).abs() <= 1e-5 * wv.abs().max(1e-6), "step {s} {name}: {g} vs {wv}");
        }
    }
    compare("AutoencoderKL after 5 steps", &ae.vs, &load("aekl_after.pt"));
    compare("PatchDiscriminator after 5 steps (BatchNorm statistics included)", &d_vs, &load("disc_after.pt"));
}
