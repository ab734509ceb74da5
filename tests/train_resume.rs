//! `medgen train` resumes exactly: for each stage, training straight through and training with an
//! interruption (a stop after some steps, or a SIGKILL at an arbitrary moment) then `--resume`
//! give byte-identical final weights. Tiny networks on a tiny generated data set, CPU.
mod common;

use common::run::{configs, data, medgen, ok, s};
use medgen::checkpoint::StateDict;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn train(stage: &str, cfg: &Path, data: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", stage, "--config", s(cfg), "--data", s(data), "--run", s(run)];
    args.extend(extra);
    medgen(&args)
}

/// The final weights of a run. Compared tensor by tensor: the safetensors header's metadata order
/// is not fixed from one process to the next, the tensors are.
fn final_weights(run: &Path) -> Weights {
    Weights(StateDict::load(&run.join("final_model.safetensors"), None).unwrap())
}

struct Weights(StateDict);

impl PartialEq for Weights {
    fn eq(&self, other: &Self) -> bool {
        self.0.names() == other.0.names() && self.0.iter().all(|(k, t)| other.0.get(k).is_some_and(|o| o.equal(t)))
    }
}

#[test]
fn every_stage_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    let [aekl, ldm, cn] = configs(d, 2);
    let runs = d.join("runs");
    // AutoencoderKL: straight, and stopped at step 4 (mid-epoch, after the adversarial start) then resumed.
    ok(train("aekl", &aekl, d, &runs.join("aekl"), &[]));
    ok(train("aekl", &aekl, d, &runs.join("aekl_r"), &["--max-steps", "4"]));
    let msg = ok(train("aekl", &aekl, d, &runs.join("aekl_r"), &["--resume"]));
    assert!(msg.contains("resuming aekl at epoch 1 step 4"), "{msg}");
    assert!(final_weights(&runs.join("aekl")) == final_weights(&runs.join("aekl_r")), "aekl: resumed != straight");
    for f in ["best_model.safetensors", "loss_curve.png", "metrics.jsonl", "reconstructions_epoch0002.png"] {
        assert!(runs.join("aekl").join(f).is_file(), "aekl run lacks {f}");
    }
    // Without --resume an existing run is not overwritten.
    let o = train("aekl", &aekl, d, &runs.join("aekl"), &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume"));

    let aekl_w = runs.join("aekl/final_model.safetensors");
    let stage1 = ["--stage1-config", s(&aekl), "--stage1-weights", s(&aekl_w)];
    ok(train("ldm", &ldm, d, &runs.join("ldm"), &stage1));
    ok(train("ldm", &ldm, d, &runs.join("ldm_r"), &[&stage1[..], &["--max-steps", "1"]].concat()));
    ok(train("ldm", &ldm, d, &runs.join("ldm_r"), &[&stage1[..], &["--resume"]].concat()));
    assert!(final_weights(&runs.join("ldm")) == final_weights(&runs.join("ldm_r")), "ldm: resumed != straight");
    assert!(runs.join("ldm/samples_epoch0002.png").is_file());

    let ldm_w = runs.join("ldm/final_model.safetensors");
    let both = [&stage1[..], &["--ldm-config", s(&ldm), "--ldm-weights", s(&ldm_w)]].concat();
    ok(train("controlnet", &cn, d, &runs.join("cn"), &both));
    ok(train("controlnet", &cn, d, &runs.join("cn_r"), &[&both[..], &["--max-steps", "5"]].concat()));
    ok(train("controlnet", &cn, d, &runs.join("cn_r"), &[&both[..], &["--resume"]].concat()));
    assert!(final_weights(&runs.join("cn")) == final_weights(&runs.join("cn_r")), "controlnet: resumed != straight");
    // The ControlNet stage works in the LDM's latent space: the same scale factor, recorded in both weight files.
    let sf = |run: &str| final_weights(&runs.join(run)).0.metadata.get("medgen.scale_factor").cloned();
    assert!(sf("ldm").is_some() && sf("ldm") == sf("cn"), "scale factors {:?} vs {:?}", sf("ldm"), sf("cn"));
    // The ControlNet stage left the UNet it started from alone (it is a separate file) and trained its own.
    assert!(final_weights(&runs.join("cn")) != final_weights(&runs.join("ldm")));
}

/// Starts `medgen train aekl` in the background (output captured) and returns once it has written
/// its first checkpoint and run on for `settle`.
fn train_until_checkpointed(cfg: &Path, data: &Path, run: &Path, settle: Duration) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_medgen"))
        .args(["train", "aekl", "--config", s(cfg), "--data", s(data), "--run", s(run)])
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !run.join("checkpoint.safetensors").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(settle);
    child
}

#[cfg(unix)]
#[test]
fn a_run_killed_with_sigkill_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    // Long enough that the kill lands mid-run.
    let [aekl, ..] = configs(d, 25);
    let runs = d.join("runs");
    ok(train("aekl", &aekl, d, &runs.join("straight"), &[]));
    let killed = runs.join("killed");
    // Kill it once it has checkpointed a step or two, whatever it is doing at that moment.
    let mut child = train_until_checkpointed(&aekl, d, &killed, Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("final_model.safetensors").exists(), "killed too late to test anything");
    let msg = ok(train("aekl", &aekl, d, &killed, &["--resume"]));
    println!("{}", msg.lines().filter(|l| l.contains("resuming")).collect::<Vec<_>>().join("\n"));
    assert!(final_weights(&runs.join("straight")) == final_weights(&killed), "killed + resumed != straight");
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_the_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    let [aekl, ..] = configs(d, 25);
    let runs = d.join("runs");
    ok(train("aekl", &aekl, d, &runs.join("straight"), &[]));
    let run = runs.join("interrupted");
    let child = train_until_checkpointed(&aekl, d, &run, Duration::from_millis(200));
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(sent.success(), "could not send SIGINT");
    let out = child.wait_with_output().unwrap();
    let msg = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "Ctrl-C must exit cleanly, got {:?}:\n{msg}", out.status);
    assert!(msg.contains("stopped at step"), "no stop message:\n{msg}");
    assert!(!run.join("final_model.safetensors").exists(), "interrupted too late to test anything");
    let msg = ok(train("aekl", &aekl, d, &run, &["--resume"]));
    println!("{}", msg.lines().filter(|l| l.contains("resuming")).collect::<Vec<_>>().join("\n"));
    assert!(final_weights(&runs.join("straight")) == final_weights(&run), "interrupted + resumed != straight");
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    let [aekl, ..] = configs(d, 3);
    // A learning rate that blows the weights up: the next forward overflows to inf/NaN.
    let blown = std::fs::read_to_string(&aekl).unwrap().replace(r#""base_lr": 0.001"#, r#""base_lr": 1e36"#);
    std::fs::write(&aekl, blown).unwrap();
    let run = d.join("runs/nan");
    let o = train("aekl", &aekl, d, &run, &[]);
    let msg = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "a NaN run must fail:\n{msg}");
    assert!(msg.contains("stopping; the last checkpoint is kept"), "{msg}");
    assert!(!run.join("final_model.safetensors").exists());
    let ck = StateDict::load(&run.join("checkpoint.safetensors"), None).expect("the last checkpoint loads");
    for (k, t) in ck.iter() {
        if t.is_floating_point() {
            assert!(bool::try_from(t.isfinite().all()).unwrap(), "checkpoint tensor {k} is not finite");
        }
    }
    println!("{}", msg.lines().filter(|l| l.contains("stopping")).collect::<Vec<_>>().join("\n"));
}
