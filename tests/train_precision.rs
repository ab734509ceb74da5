//! `medgen train --precision bf16|fp16` on the CPU, end to end: every stage trains under autocast
//! (the LDM and ControlNet on the latents of an autocast encoder, as a real run does), logs finite
//! losses, writes a checkpoint and resumes from it to the same final weights as a run straight through.
mod common;

use common::run::{configs, data, medgen, ok, s};
use medgen::checkpoint::StateDict;
use medgen::train::checkpoint::Checkpoint;
use std::path::{Path, PathBuf};
use std::process::Output;

fn train(stage: &str, cfg: &Path, data: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", stage, "--config", s(cfg), "--data", s(data), "--run", s(run)];
    args.extend(extra);
    medgen(&args)
}

fn final_weights(run: &Path) -> StateDict {
    StateDict::load(&run.join("final_model.safetensors"), None).unwrap()
}

fn same_weights(a: &StateDict, b: &StateDict) -> bool {
    a.names() == b.names() && a.iter().all(|(k, t)| b.get(k).is_some_and(|o| o.equal(t)))
}

/// The training losses `metrics.jsonl` holds: at least one, all finite.
fn train_losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["split"] == "train")
        .map(|r| r["loss"].as_f64().unwrap_or_else(|| panic!("{}: a train line without a loss: {r}", run.display())))
        .collect();
    assert!(!losses.is_empty(), "{}: no training loss logged", run.display());
    assert!(losses.iter().all(|l| l.is_finite()), "{}: non-finite losses {losses:?}", run.display());
    losses
}

/// Trains `stage` straight through, and stopped after `stop_at` steps then resumed; checks the stopped
/// run's checkpoint (its loss scalers under fp16) and that both runs end with the same weights.
fn straight_and_resumed(stage: &str, cfg: &Path, d: &Path, runs: &Path, precision: &str, extra: &[&str], stop_at: u64) {
    let p = ["--precision", precision];
    let straight = runs.join(format!("{stage}_{precision}"));
    let resumed = runs.join(format!("{stage}_{precision}_r"));
    ok(train(stage, cfg, d, &straight, &[extra, &p].concat()));
    let stop = stop_at.to_string();
    ok(train(stage, cfg, d, &resumed, &[extra, &p, &["--max-steps", &stop]].concat()));
    let ck = Checkpoint::load(&resumed.join("checkpoint.safetensors")).unwrap();
    assert_eq!((ck.state.stage.as_str(), ck.state.step), (stage, stop_at));
    let optim_parts: &[&str] = if stage == "aekl" { &["optim.g", "optim.d"] } else { &["optim"] };
    for part in optim_parts {
        let sd = ck.part(part).unwrap();
        let scaled = precision == "fp16";
        assert_eq!(sd.metadata.get("scaler.enabled").map(String::as_str), Some(if scaled { "true" } else { "false" }));
        if scaled {
            let scale = f64::try_from(sd.get("scaler.scale").expect("the fp16 loss scale is saved")).unwrap();
            assert!(scale.is_finite() && scale > 0.0, "{stage} {part}: loss scale {scale}");
        }
    }
    let msg = ok(train(stage, cfg, d, &resumed, &[extra, &p, &["--resume"]].concat()));
    assert!(msg.contains(&format!("resuming {stage}")), "{msg}");
    train_losses(&straight);
    train_losses(&resumed);
    assert!(
        same_weights(&final_weights(&straight), &final_weights(&resumed)),
        "{stage} {precision}: resumed != straight"
    );
}

#[test]
fn every_stage_trains_and_resumes_under_bf16_and_fp16() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    let [aekl, ldm, cn] = configs(d, 2);
    let runs = d.join("runs");
    // An fp32 autoencoder, to tell an autocast run from one that ignored --precision.
    let fp32_stage1: PathBuf = runs.join("aekl_fp32/final_model.safetensors");
    ok(train("aekl", &aekl, d, &runs.join("aekl_fp32"), &[]));
    for precision in ["bf16", "fp16"] {
        // 3 batches an epoch; the adversarial loss starts at epoch 1: stopped after it started.
        straight_and_resumed("aekl", &aekl, d, &runs, precision, &[], 4);
        let aekl_w = runs.join(format!("aekl_{precision}/final_model.safetensors"));
        assert!(
            !same_weights(
                &final_weights(&runs.join(format!("aekl_{precision}"))),
                &StateDict::load(&fp32_stage1, None).unwrap()
            ),
            "aekl {precision}: the same weights as the fp32 run"
        );
        let stage1 = ["--stage1-config", s(&aekl), "--stage1-weights", s(&aekl_w)];
        straight_and_resumed("ldm", &ldm, d, &runs, precision, &stage1, 2);
        let ldm_w = runs.join(format!("ldm_{precision}/final_model.safetensors"));
        let both = [&stage1[..], &["--ldm-config", s(&ldm), "--ldm-weights", s(&ldm_w)]].concat();
        straight_and_resumed("controlnet", &cn, d, &runs, precision, &both, 4);
    }
}
