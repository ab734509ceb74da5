//! Training-step parity: 5 AdamW steps of the LDM objective and of the ControlNet objective (UNet
//! frozen) from the same initial weights and draws as MONAI (tests/gen_train_step_fixtures.py); the
//! LDM's also under CPU autocast (bf16, and fp16 with the dynamic loss scaler) against `torch.autocast`.
mod common;

use common::{fixtures, max_abs, max_abs_diff};
use medgen::amp::Precision;
use medgen::checkpoint::{load_model, Generation, StateDict};
use medgen::nets::{ControlNet, ControlNetConfig, DiffusionModelUNet, DiffusionModelUNetConfig};
use medgen::schedulers::{NoiseSchedule, PredictionType, SchedulerConfig};
use medgen::train::diffusion::{diffusion_loss, diffusion_step, ControlInput};
use medgen::train::grad_scaler::GradScaler;
use medgen::train::optim::{Adam, AdamConfig};
use serde_json::Value;
use tch::Device;

/// fp32 CPU, one thread on both sides: a few ulp of summation-order difference in the backward
/// pass is all that can separate the two after 5 steps.
const REL_TOL: f64 = 1e-5;

fn compare(what: &str, vs: &tch::nn::VarStore, want: &StateDict) {
    let mut worst = (0.0f64, String::new());
    for (k, v) in vs.variables() {
        let w = want.get(&k).unwrap_or_else(|| panic!("{what}: {k} not in the reference"));
        let rel = max_abs_diff(&v, w) / max_abs(w).max(1e-12);
        if rel > worst.0 {
            worst = (rel, k);
        }
    }
    println!("{what}: worst relative weight error {:.3e} ({})", worst.0, worst.1);
    assert!(worst.0 <= REL_TOL, "{what}: {} differs by {:e} relative", worst.1, worst.0);
}

#[test]
fn ldm_and_controlnet_steps_match_monai() {
    tch::set_num_threads(1);
    let root = fixtures().join("train_step");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    let unet_cfg: DiffusionModelUNetConfig = serde_json::from_value(m["unet"].clone()).unwrap();
    let cn_cfg: ControlNetConfig = serde_json::from_value(m["controlnet"].clone()).unwrap();
    let sched_cfg: SchedulerConfig = serde_json::from_value(m["scheduler"].clone()).unwrap();
    let schedule = NoiseSchedule::from_config(&sched_cfg).unwrap();
    let lr = m["lr"].as_f64().unwrap();
    let steps = m["steps"].as_u64().unwrap() as usize;
    let draws = StateDict::load(&root.join("draws.safetensors"), None).unwrap();
    let d = |k: &str, s: usize| draws.get(&format!("{k}.{s}")).unwrap().shallow_clone();
    let load = |f: &str| StateDict::load(&root.join(f), None).unwrap();
    let want_losses = |stage: &str| -> Vec<f64> {
        m["losses"][stage].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };

    // LDM: the UNet trains, in fp32 and under CPU autocast (bf16; fp16 with the loss scaler).
    for (precision, key, after) in [
        (Precision::Fp32, "ldm", "unet_after.pt"),
        (Precision::Bf16, "ldm_bf16", "unet_after_bf16.pt"),
        (Precision::Fp16, "ldm_fp16", "unet_after_fp16.pt"),
    ] {
        let unet =
            load_model(load("unet_init.pt"), Device::Cpu, |p, g| DiffusionModelUNet::new(p, &unet_cfg, g)).unwrap();
        assert_eq!(unet.generation, Generation::Monai);
        let mut opt = Adam::from_var_store(AdamConfig::adamw(lr), &unet.vs).unwrap();
        let mut scaler = GradScaler::for_precision(precision).unwrap();
        for (s, want) in want_losses(key).into_iter().enumerate().take(steps) {
            let ctx = d("context", s);
            let loss = diffusion_step(&mut opt, &mut scaler, precision, Device::Cpu, || {
                diffusion_loss(
                    &unet.model,
                    None,
                    &schedule,
                    PredictionType::VPrediction,
                    &d("latent", s),
                    &d("noise", s),
                    &d("timesteps", s),
                    Some(&ctx),
                )
            })
            .unwrap();
            let got = f64::try_from(&loss).unwrap();
            println!("{key} step {s}: loss {got:.7} (PyTorch {want:.7})");
            assert!((got - want).abs() <= 1e-5 * want.abs(), "{key} step {s}: loss {got} vs {want}");
        }
        compare(&format!("LDM UNet after 5 steps ({precision:?})"), &unet.vs, &load(after));
    }

    // ControlNet: initialised from the UNet, which is frozen.
    let mut frozen =
        load_model(load("unet_init.pt"), Device::Cpu, |p, g| DiffusionModelUNet::new(p, &unet_cfg, g)).unwrap();
    frozen.vs.freeze();
    let cn = load_model(load("controlnet_init.pt"), Device::Cpu, |p, g| ControlNet::new(p, &cn_cfg, g)).unwrap();
    let mut opt = Adam::from_var_store(AdamConfig::adamw(lr), &cn.vs).unwrap();
    for (s, want) in want_losses("controlnet").into_iter().enumerate().take(steps) {
        opt.zero_grad();
        let (ctx, cond) = (d("context", s), d("cond", s));
        let control = ControlInput { controlnet: &cn.model, cond: &cond };
        let loss = diffusion_loss(
            &frozen.model,
            Some(&control),
            &schedule,
            PredictionType::VPrediction,
            &d("latent", s),
            &d("noise", s),
            &d("timesteps", s),
            Some(&ctx),
        )
        .unwrap();
        loss.backward();
        opt.step().unwrap();
        let got = f64::try_from(&loss).unwrap();
        println!("controlnet step {s}: loss {got:.7} (MONAI {want:.7})");
        assert!((got - want).abs() <= 1e-5 * want.abs(), "controlnet step {s}: loss {got} vs {want}");
    }
    compare("ControlNet after 5 steps", &cn.vs, &load("controlnet_after.pt"));
    // The frozen UNet did not move.
    compare("frozen UNet", &frozen.vs, &load("unet_init.pt"));
}
