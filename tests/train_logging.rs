//! Training losses are read from the device once per `log_every` steps (and before each checkpoint), not at
//! every step: `metrics.jsonl` still gets one line per step, the same lines whatever the interval, and a
//! non-finite loss still stops the run, at the end of its interval at the latest, before any checkpoint holds it.
mod common;

use common::run::{configs, data, medgen, ok, s};
use std::path::Path;

/// The aekl config of the end-to-end tests with the given cadence (and learning rate).
fn config(d: &Path, name: &str, checkpoint_every: u64, log_every: u64, lr: &str) -> std::path::PathBuf {
    let [aekl, ..] = configs(d, 2);
    let text =
        std::fs::read_to_string(aekl).unwrap().replace(r#""base_lr": 0.001"#, &format!(r#""base_lr": {lr}"#)).replace(
            r#""checkpoint_every": 1"#,
            &format!(r#""checkpoint_every": {checkpoint_every}, "log_every": {log_every}"#),
        );
    assert!(text.contains("log_every"), "the test config changed: {text}");
    let p = d.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn train(cfg: &Path, d: &Path, run: &Path) -> std::process::Output {
    medgen(&["train", "aekl", "--config", s(cfg), "--data", s(d), "--run", s(run)])
}

fn train_lines(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["split"] == "train")
        .collect()
}

#[test]
fn losses_read_per_interval_log_every_step_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    let every = config(d, "every.json", 100, 1, "0.001");
    let batched = config(d, "batched.json", 100, 4, "0.001");
    ok(train(&every, d, &d.join("every")));
    ok(train(&batched, d, &d.join("batched")));
    let (a, b) = (train_lines(&d.join("every")), train_lines(&d.join("batched")));
    // 10 training images in batches of 4, 2 epochs.
    let steps: Vec<u64> = b.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
    assert_eq!(a, b, "the logged losses depend on the logging interval");
    for k in ["loss", "l1", "p_loss", "kl", "g_adv", "d_loss"] {
        assert!(b.iter().all(|r| r[k].is_f64()), "a line lacks {k}: {b:?}");
    }
    assert!(b[4]["d_loss"].as_f64().unwrap() > 0.0, "the discriminator loss after adv_start is not logged");
}

#[test]
fn a_nan_loss_between_checkpoints_stops_the_run_at_its_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    // A learning rate that blows the weights up; no checkpoint before the end, losses read every 2 steps.
    let cfg = config(d, "nan.json", 100, 2, "1e36");
    let run = d.join("nan");
    let o = train(&cfg, d, &run);
    let msg = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "a NaN run must fail:\n{msg}");
    assert!(msg.contains("stopping; the last checkpoint is kept"), "{msg}");
    assert!(!run.join("checkpoint.safetensors").exists(), "a checkpoint was written after a NaN loss");
    let lines = train_lines(&run);
    // The first non-finite loss is named, and the run did not go past the end of its interval.
    let first_bad = lines.iter().find(|r| !r["loss"].is_f64()).expect("the non-finite loss is logged");
    let step = first_bad["step"].as_u64().unwrap();
    assert!(msg.contains(&format!("at step {step}")), "{msg}");
    assert!(lines.len() as u64 <= step.div_ceil(2) * 2, "ran on past the interval: {lines:?}");
}
