//! The training stages with fp16 autocast + loss scaling and with bf16, stopped and resumed, and
//! FLAIR->T1w sampling on CUDA against the CPU: this same binary run as `medgen train` and
//! `medgen sample` on a tiny data set it writes first.
use super::{Report, Status};
use anyhow::{bail, ensure, Context, Result};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Device;

/// Image side of the tiny data set (latents are half of it).
const SIZE: u32 = 32;
/// Epochs of a check run; 10 training images in batches of 4 are 3 steps an epoch.
const EPOCHS: u64 = 5;
const STEPS: u64 = EPOCHS * 3;
/// Where each check run is stopped and resumed (mid-epoch).
const STOP_AT: u64 = 4;
/// DDIM steps of the sampling check.
const SAMPLE_STEPS: &str = "10";

/// The tiny data set and the stage configs in the scratch folder.
pub(super) struct Setup {
    work: PathBuf,
    data: PathBuf,
    aekl: PathBuf,
    ldm: PathBuf,
    controlnet: PathBuf,
}

impl Setup {
    pub(super) fn new(work: &Path) -> Result<Self> {
        let data = work.join("data");
        std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
        write_data(&data)?;
        let [aekl, ldm, controlnet] = write_configs(work)?;
        Ok(Self { work: work.to_path_buf(), data, aekl, ldm, controlnet })
    }

    /// The T1w images of the data set, for the FID features.
    pub(super) fn images(&self) -> Vec<PathBuf> {
        (0..4).map(|i| self.data.join(format!("s{i}_T1w.png"))).collect()
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.work.join("runs").join(name)
    }

    fn weights(&self, run: &str) -> PathBuf {
        self.run_dir(run).join("final_model.safetensors")
    }

    /// The arguments naming the frozen stages a stage trains on (the fp32 base runs).
    fn frozen(&self, stage: &str) -> Vec<OsString> {
        let mut a = Vec::new();
        if stage != "aekl" {
            a.extend([
                arg("--stage1-config"),
                arg(&self.aekl),
                arg("--stage1-weights"),
                arg(self.weights("base_aekl")),
            ]);
        }
        if stage == "controlnet" {
            a.extend([arg("--ldm-config"), arg(&self.ldm), arg("--ldm-weights"), arg(self.weights("base_ldm"))]);
        }
        a
    }

    fn config(&self, stage: &str) -> &Path {
        match stage {
            "aekl" => &self.aekl,
            "ldm" => &self.ldm,
            _ => &self.controlnet,
        }
    }

    /// `medgen train <stage>` into `runs/<run>`.
    fn train(&self, stage: &str, run: &str, device: &str, extra: &[&str]) -> Result<String> {
        let mut a = vec![arg("train"), arg(stage), arg("--config"), arg(self.config(stage)), arg("--data")];
        a.extend([arg(&self.data), arg("--run"), arg(self.run_dir(run)), arg("--device"), arg(device)]);
        a.extend(self.frozen(stage));
        a.extend(extra.iter().map(arg));
        medgen(&format!("train {stage} --device {device} {}", extra.join(" ")), &a)
    }
}

fn arg(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// Runs this binary; its output, or an error with `what` (the command, paths left out) and the
/// end of what it printed.
fn medgen(what: &str, args: &[OsString]) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the running medgen binary")?;
    let o = Command::new(&exe).args(args).output().with_context(|| format!("cannot run {}", exe.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    if !o.status.success() {
        bail!("`medgen {what}` failed ({}): {}", o.status, tail(&text, 300));
    }
    Ok(text)
}

/// The last `n` characters of `s` (progress bars' carriage returns cut out).
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> =
        s.lines().map(|l| l.rsplit('\r').next().unwrap_or(l).trim()).filter(|l| !l.is_empty()).collect();
    let joined = lines.join(" / ");
    let start = joined.char_indices().rev().nth(n).map_or(0, |(i, _)| i);
    joined[start..].to_string()
}

/// 12 T1w/FLAIR pairs with a bright disc, split 10/2 (the end-to-end tests' data set).
fn write_data(dir: &Path) -> Result<()> {
    let mut lists = [String::from("t1w\tflair\n"), String::from("t1w\tflair\n")];
    let (c, r2) = (SIZE as i32 / 2, 150 * (SIZE * SIZE) / (32 * 32));
    for i in 0..12u32 {
        let t1w = image::GrayImage::from_fn(SIZE, SIZE, |x, y| {
            let d = ((x as i32 - c).pow(2) + (y as i32 - c).pow(2)) as u32;
            image::Luma([if d < r2 { 120 + ((x * 3 + y * 5 + i * 17) % 90) as u8 } else { (i * 7 % 20) as u8 }])
        });
        let flair = image::GrayImage::from_fn(SIZE, SIZE, |x, y| image::Luma([255 - t1w.get_pixel(x, y)[0] / 2]));
        let (t, f) = (dir.join(format!("s{i}_T1w.png")), dir.join(format!("s{i}_FLAIR.png")));
        t1w.save(&t).with_context(|| format!("cannot write {}", t.display()))?;
        flair.save(&f).with_context(|| format!("cannot write {}", f.display()))?;
        lists[(i >= 10) as usize].push_str(&format!("{}\t{}\n", t.display(), f.display()));
    }
    for (name, list) in ["train.tsv", "validation.tsv"].iter().zip(&lists) {
        std::fs::write(dir.join(name), list).with_context(|| format!("cannot write {name} in {}", dir.display()))?;
    }
    Ok(())
}

/// The end-to-end tests' tiny stages, with a sampling section.
fn write_configs(dir: &Path) -> Result<[PathBuf; 3]> {
    let train = format!(
        r#""train": {{"batch_size": 4, "n_epochs": {EPOCHS}, "eval_freq": 1, "seed": 5, "checkpoint_every": 1,
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
    let half = SIZE / 2;
    let sampling = format!(r#""sampling": {{"num_inference_steps": 3, "latent_shape": [3, {half}, {half}]}}"#);
    let ldm = format!(
        r#"{{"ldm": {{"base_lr": 0.001, "params": {{{encoder}, "out_channels": 3}}, {sched}}}, {train}, {sampling}}}"#
    );
    let cn = format!(
        r#"{{"controlnet": {{"base_lr": 0.001, "params": {{{encoder}, "conditioning_embedding_num_channels": [8, 8]}}}},
 "ldm": {{{sched}}}, {train}, {sampling}}}"#
    );
    let paths = [dir.join("aekl.json"), dir.join("ldm.json"), dir.join("controlnet.json")];
    for (p, c) in paths.iter().zip([aekl, ldm, cn]) {
        std::fs::write(p, c).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(paths)
}

fn device_arg(cuda: Option<Device>) -> String {
    match cuda {
        Some(Device::Cuda(i)) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}

/// The fp32 runs of each stage: the frozen stages of the others and the sampling check's networks.
pub(super) fn base_runs(report: &mut Report, s: &Setup, cuda: Option<Device>) {
    let dev = device_arg(cuda);
    for stage in ["aekl", "ldm", "controlnet"] {
        report.check(&format!("train {stage} fp32 (base run for the others)"), &dev, || {
            s.train(stage, &format!("base_{stage}"), &dev, &["--precision", "fp32"])?;
            losses_report(&s.run_dir(&format!("base_{stage}")))
        });
    }
}

/// Every stage with fp16 and with bf16: stopped at step `STOP_AT`, resumed to the end.
pub(super) fn train(report: &mut Report, s: &Setup, cuda: Option<Device>) {
    let dev = device_arg(cuda);
    for stage in ["aekl", "ldm", "controlnet"] {
        for (precision, how) in [("fp16", "fp16 autocast + loss scaler"), ("bf16", "bf16 autocast")] {
            let run = format!("{stage}_{precision}");
            report.check(&format!("train {stage} {how}, stopped at step {STOP_AT} and resumed"), &dev, || {
                let stop = STOP_AT.to_string();
                s.train(stage, &run, &dev, &["--precision", precision, "--max-steps", &stop])?;
                let out = s.train(stage, &run, &dev, &["--precision", precision, "--resume"])?;
                let epoch = STOP_AT / 3;
                let said = format!("resuming {stage} at epoch {epoch} step {STOP_AT}");
                ensure!(out.contains(&said), "the resumed run did not say {said:?}: {}", tail(&out, 300));
                ensure!(s.weights(&run).is_file(), "no {} after the resumed run", s.weights(&run).display());
                let (result, status) = losses_report(&s.run_dir(&run))?;
                Ok((format!("{result}; resumed at step {STOP_AT}"), status))
            });
        }
    }
}

/// Every training step logged once with finite losses, and the validation loss (fixed noise and
/// timesteps per batch, so free of the training steps' sampling noise) lower after the last epoch
/// than after the first.
fn losses_report(run: &Path) -> Result<(String, Status)> {
    let log = crate::train::run::RunDir { root: run.to_path_buf() }.read_log()?;
    let split = |name: &str| log.iter().filter(|r| r["split"] == name).collect::<Vec<_>>();
    let (train, val) = (split("train"), split("val"));
    let steps: Vec<u64> = train.iter().filter_map(|r| r["step"].as_u64()).collect();
    ensure!(steps == (1..=STEPS).collect::<Vec<_>>(), "logged training steps {steps:?}, expected 1..={STEPS}");
    for r in &train {
        let obj = r.as_object().context("a log record is not a JSON object")?;
        let bad = obj
            .iter()
            .find(|(k, v)| !matches!(k.as_str(), "stage" | "split") && !v.as_f64().is_some_and(f64::is_finite));
        if let Some((k, v)) = bad {
            return Ok((format!("{k} at step {} is {v}", r["step"]), Status::Fail("not finite".into())));
        }
    }
    let val: Vec<f64> = val.iter().map(|r| r["loss"].as_f64().unwrap_or(f64::NAN)).collect();
    ensure!(val.len() as u64 == EPOCHS, "{} validation losses logged, expected {EPOCHS}", val.len());
    let (first, last) = (val[0], val[val.len() - 1]);
    let result =
        format!("{STEPS} steps, losses finite; validation loss {first:.5} -> {last:.5} (epochs 1 -> {EPOCHS})");
    Ok((result, if last < first { Status::Pass } else { Status::Fail("the validation loss did not go down".into()) }))
}

/// FLAIR->T1w sampling of the validation list with the fp32 base networks, on the CPU then on
/// CUDA from the same CPU-drawn noise: with the reference's DDIM in fp32, every PNG within one grey
/// level on at least 99 % of pixels; with DPM-Solver++ and bf16 networks (the fast path, where the
/// two devices' bf16 kernels round differently), every PNG at least 30 dB PSNR from the CPU's.
pub(super) fn sample(report: &mut Report, s: &Setup, cuda: Option<Device>) {
    sample_with(report, s, cuda, "sample flair-to-t1w", "ddim", &[]);
    sample_with(
        report,
        s,
        cuda,
        "sample flair-to-t1w, dpm-solver++ bf16",
        "dpm",
        &["--scheduler", "dpm-solver++", "--precision", "bf16"],
    );
}

fn sample_with(report: &mut Report, s: &Setup, cuda: Option<Device>, name: &str, tag: &str, extra: &[&str]) {
    let fast = !extra.is_empty();
    let out = |dev: &str| s.work.join(format!("samples_{tag}_{}", dev.replace(':', "")));
    let sample_on = |dev: &str| -> Result<usize> {
        let mut a = vec![arg("sample"), arg("flair-to-t1w"), arg("--device"), arg(dev), arg("--steps")];
        a.extend([
            arg(SAMPLE_STEPS),
            arg("--input"),
            arg(s.data.join("validation.tsv")),
            arg("--output"),
            arg(out(dev)),
        ]);
        a.extend(extra.iter().map(arg));
        a.extend(s.frozen("controlnet"));
        a.extend([arg("--controlnet-config"), arg(&s.controlnet)]);
        a.extend([arg("--controlnet-weights"), arg(s.weights("base_controlnet"))]);
        medgen(&format!("{name} --device {dev}"), &a)?;
        Ok(pngs(&out(dev))?.len())
    };
    let mut cpu_ok = false;
    report.check(name, "cpu", || {
        let n = sample_on("cpu")?;
        ensure!(n > 0, "no PNG written in {}", out("cpu").display());
        cpu_ok = true;
        Ok((format!("{n} PNGs, {SAMPLE_STEPS} steps"), Status::Pass))
    });
    let compare = format!("{name}: cuda vs cpu PNGs");
    match cuda {
        None => report.skip(&compare, "cuda", "no CUDA"),
        Some(_) if !cpu_ok => report.skip(&compare, "cuda", "the CPU sampling failed"),
        Some(d) => report.check(&compare, &format!("{d:?}"), || {
            let dev = device_arg(cuda);
            sample_on(&dev)?;
            let names = pngs(&out("cpu"))?;
            ensure!(names == pngs(&out(&dev))?, "the CPU and CUDA runs wrote different files");
            let (mut worst_frac, mut worst_psnr, mut worst) = (1.0f64, f64::INFINITY, String::new());
            for n in &names {
                let (frac, psnr) = compare_pngs(&out("cpu").join(n), &out(&dev).join(n))?;
                if (fast && psnr < worst_psnr) || (!fast && frac < worst_frac) {
                    worst = n.clone();
                }
                worst_frac = worst_frac.min(frac);
                worst_psnr = worst_psnr.min(psnr);
            }
            let result = format!(
                "{} PNGs; worst {worst}: {:.2} % of pixels within 1 level, PSNR {worst_psnr:.1} dB (bound {})",
                names.len(),
                100.0 * worst_frac,
                if fast { "30 dB" } else { "99 % within 1 level" }
            );
            let pass = if fast { worst_psnr >= 30.0 } else { worst_frac >= 0.99 };
            Ok((result, if pass { Status::Pass } else { Status::Fail("below the bound".into()) }))
        }),
    }
}

fn pngs(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".png"))
        .collect();
    v.sort();
    Ok(v)
}

/// Of two 8-bit grey PNGs of one size: the fraction of pixels that differ by at most one level,
/// and the PSNR (levels scaled to [0, 1]; infinite when equal).
fn compare_pngs(a: &Path, b: &Path) -> Result<(f64, f64)> {
    let read = |p: &Path| -> Result<image::GrayImage> {
        Ok(image::open(p).with_context(|| format!("cannot read {}", p.display()))?.to_luma8())
    };
    let (a_img, b_img) = (read(a)?, read(b)?);
    ensure!(
        a_img.dimensions() == b_img.dimensions(),
        "{} is {:?}, {} is {:?}",
        a.display(),
        a_img.dimensions(),
        b.display(),
        b_img.dimensions()
    );
    let n = a_img.as_raw().len().max(1) as f64;
    let pairs = || a_img.as_raw().iter().zip(b_img.as_raw());
    let close = pairs().filter(|(x, y)| x.abs_diff(**y) <= 1).count();
    let mse = pairs().map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>() / n / (255.0 * 255.0);
    Ok((close as f64 / n, if mse > 0.0 { 10.0 * (1.0 / mse).log10() } else { f64::INFINITY }))
}
