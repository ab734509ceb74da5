//! `medgen train` resumes exactly: for each stage, training straight through and training with an
//! interruption (a stop after some steps, or a SIGKILL at an arbitrary moment) then `--resume`
//! give byte-identical final weights. Tiny networks on a tiny generated data set, CPU.
use medgen::checkpoint::StateDict;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn medgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medgen")).args(args).env("OMP_NUM_THREADS", "1").output().expect("medgen runs")
}

fn ok(o: Output) -> String {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "medgen failed:\n{out}\n{err}");
    format!("{out}{err}")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// 12 T1w/FLAIR PNG pairs of 32x32 with some structure, split 10/2.
fn data(dir: &Path) {
    let mut lists = [String::from("t1w\tflair\n"), String::from("t1w\tflair\n")];
    for i in 0..12u32 {
        let t1w = image::GrayImage::from_fn(32, 32, |x, y| {
            let d = ((x as i32 - 16).pow(2) + (y as i32 - 16).pow(2)) as u32;
            image::Luma([if d < 150 { 120 + ((x * 3 + y * 5 + i * 17) % 90) as u8 } else { (i * 7 % 20) as u8 }])
        });
        let flair = image::GrayImage::from_fn(32, 32, |x, y| image::Luma([255 - t1w.get_pixel(x, y)[0] / 2]));
        let (t, f) = (dir.join(format!("s{i}_T1w.png")), dir.join(format!("s{i}_FLAIR.png")));
        t1w.save(&t).unwrap();
        flair.save(&f).unwrap();
        lists[(i >= 10) as usize].push_str(&format!("{}\t{}\n", t.display(), f.display()));
    }
    std::fs::write(dir.join("train.tsv"), &lists[0]).unwrap();
    std::fs::write(dir.join("validation.tsv"), &lists[1]).unwrap();
}

fn configs(dir: &Path, epochs: u32) -> [PathBuf; 3] {
    let train = format!(
        r#""train": {{"batch_size": 4, "n_epochs": {epochs}, "eval_freq": 1, "seed": 5, "checkpoint_every": 1,
  "adv_start": 1, "sample_steps": 2, "context_dropout": 0.1}}"#
    );
    let aekl = format!(
        r#"{{"stage1": {{"base_lr": 0.001, "disc_lr": 0.001, "perceptual_weight": 0.0, "adv_weight": 0.01,
  "kl_weight": 1e-6, "params": {{"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [8, 8],
  "latent_channels": 3, "num_res_blocks": 1, "attention_levels": [false, false], "norm_num_groups": 4,
  "with_encoder_nonlocal_attn": false, "with_decoder_nonlocal_attn": false}}}},
 "discriminator": {{"params": {{"spatial_dims": 2, "channels": 8, "num_layers_d": 2, "in_channels": 1}}}},
 {train}}}"#
    );
    let sched = r#""scheduler": {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205,
  "prediction_type": "v_prediction"}"#;
    let encoder = r#""spatial_dims": 2, "in_channels": 3, "num_res_blocks": 1, "channels": [8, 16],
  "attention_levels": [false, true], "num_head_channels": [0, 8], "norm_num_groups": 4"#;
    let ldm =
        format!(r#"{{"ldm": {{"base_lr": 0.001, "params": {{{encoder}, "out_channels": 3}}, {sched}}}, {train}}}"#);
    let cn = format!(
        r#"{{"controlnet": {{"base_lr": 0.001, "params": {{{encoder}, "conditioning_embedding_num_channels": [8, 8]}}}},
 "ldm": {{{sched}}}, {train}}}"#
    );
    let paths = [dir.join("aekl.json"), dir.join("ldm.json"), dir.join("controlnet.json")];
    for (p, c) in paths.iter().zip([aekl, ldm, cn]) {
        std::fs::write(p, c).unwrap();
    }
    paths
}

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
    data(d);
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

#[cfg(unix)]
#[test]
fn a_run_killed_with_sigkill_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d);
    // Long enough that the kill lands mid-run.
    let [aekl, ..] = configs(d, 25);
    let runs = d.join("runs");
    ok(train("aekl", &aekl, d, &runs.join("straight"), &[]));
    let killed = runs.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_medgen"))
        .args(["train", "aekl", "--config", s(&aekl), "--data", s(d), "--run", s(&killed)])
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has checkpointed a step or two, whatever it is doing at that moment.
    let start = std::time::Instant::now();
    while !killed.join("checkpoint.safetensors").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(300));
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
    data(d);
    let [aekl, ..] = configs(d, 25);
    let runs = d.join("runs");
    ok(train("aekl", &aekl, d, &runs.join("straight"), &[]));
    let run = runs.join("interrupted");
    let child = Command::new(env!("CARGO_BIN_EXE_medgen"))
        .args(["train", "aekl", "--config", s(&aekl), "--data", s(d), "--run", s(&run)])
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
    std::thread::sleep(Duration::from_millis(200));
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
    data(d);
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
