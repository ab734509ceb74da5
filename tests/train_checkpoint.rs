//! Training checkpoints round-trip, and a writer killed with SIGKILL at any moment leaves a
//! loadable checkpoint behind (written under a temporary name, then renamed).
use medgen::checkpoint::StateDict;
use medgen::train::checkpoint::{Checkpoint, TrainState};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tch::{Kind, Tensor};

fn checkpoint(step: u64) -> Checkpoint {
    let mut model = StateDict::new();
    // Big enough that a write takes a while: a kill lands mid-write.
    model.insert("w", Tensor::full([2_000_000], step as f64, (Kind::Float, tch::Device::Cpu)));
    model.insert("b", Tensor::arange(7, (Kind::Int64, tch::Device::Cpu)));
    let mut optim = StateDict::new();
    optim.insert("exp_avg.w", Tensor::ones([3, 3], (Kind::Float, tch::Device::Cpu)) * step as f64);
    let mut c = Checkpoint::default();
    c.parts.insert("model.unet".into(), model);
    c.parts.insert("optim.unet".into(), optim);
    c.state =
        TrainState { stage: "ldm".into(), epoch: step / 10, step, best_val_loss: Some(0.5), ..Default::default() };
    c.state.extra.insert("scale_factor".into(), 0.3);
    c.config = "{\"a\": 1}".into();
    c
}

fn check_consistent(path: &Path) -> u64 {
    let c = Checkpoint::load(path).expect("the last checkpoint must stay loadable");
    let step = c.state.step;
    let w = c.part("model.unet").unwrap().get("w").unwrap().shallow_clone();
    assert!(w.eq(step as f64).all().int64_value(&[]) == 1, "weights and state come from the same write");
    step
}

#[test]
fn round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("runs/ckpt.safetensors");
    checkpoint(12).save(&p).unwrap();
    let c = Checkpoint::load(&p).unwrap();
    assert_eq!(c.state, TrainState { format_version: 1, ..checkpoint(12).state });
    assert_eq!(c.config, "{\"a\": 1}");
    assert!(c
        .part("optim.unet")
        .unwrap()
        .get("exp_avg.w")
        .unwrap()
        .equal(&(Tensor::ones([3, 3], (Kind::Float, tch::Device::Cpu)) * 12.0)));
    let e = format!("{:#}", c.part("scaler").unwrap_err());
    assert!(e.contains("no `scaler`") && e.contains("model.unet"), "{e}");
    // Not a training checkpoint, and a truncated file: named errors.
    let mut plain = StateDict::new();
    plain.insert("x", Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)));
    let q = tmp.path().join("plain.safetensors");
    plain.save_safetensors(&q, &Default::default()).unwrap();
    let e = format!("{:#}", Checkpoint::load(&q).unwrap_err());
    assert!(e.contains("plain.safetensors") && e.contains("not a medgen training checkpoint"), "{e}");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&q, &bytes[..bytes.len() / 2]).unwrap();
    assert!(format!("{:#}", Checkpoint::load(&q).unwrap_err()).contains("plain.safetensors"));
}

/// The child side of `sigkill_mid_write_keeps_the_last_checkpoint`: writes checkpoints forever.
#[test]
fn checkpoint_writer_child() {
    let Some(path) = std::env::var_os("MEDGEN_CKPT_CHILD") else { return };
    for step in 1.. {
        checkpoint(step).save(Path::new(&path)).unwrap();
    }
}

#[cfg(unix)]
#[test]
fn sigkill_mid_write_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ckpt.safetensors");
    checkpoint(0).save(&path).unwrap();
    let mut last = 0;
    for delay_ms in [0, 3, 11, 23, 37] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "checkpoint_writer_child", "--nocapture"])
            .env("MEDGEN_CKPT_CHILD", &path)
            .spawn()
            .unwrap();
        // Let the child get going (a new checkpoint appears), then kill it at an arbitrary moment.
        let start = std::time::Instant::now();
        while check_consistent(&path) <= last {
            assert!(start.elapsed() < Duration::from_secs(60), "the writer never wrote");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL on unix
        child.wait().unwrap();
        let step = check_consistent(&path);
        assert!(step > last, "the checkpoint went backwards or never advanced");
        last = step;
    }
    println!("after 5 kills the checkpoint is at step {last}, intact");
}
