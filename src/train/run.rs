//! What every training stage shares: the `train` config section, the run directory (checkpoint,
//! weights, JSON-lines metrics, loss curve and image grid PNGs), per-step seeding, Ctrl-C.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The `train` section of a stage config: the loop settings the reference passes on its command
/// line (batch size, epochs, validation frequency, seed) plus medgen's checkpoint cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    pub batch_size: usize,
    pub n_epochs: u64,
    pub eval_freq: u64,
    pub seed: u64,
    /// Write a checkpoint every this many optimiser steps (and at every validation).
    pub checkpoint_every: u64,
    /// Read the training losses from the device, log them (a line per step) and check them for
    /// NaN every this many steps (and before every checkpoint): one device sync per interval.
    pub log_every: u64,
    /// AutoencoderKL: the epoch the adversarial loss starts at.
    pub adv_start: u64,
    /// LDM/ControlNet: the probability a sample's prompt is replaced by the null prompt.
    pub context_dropout: f64,
    /// LDM/ControlNet: the latent scale factor; `None` computes 1/std of encoded training latents.
    pub scale_factor: Option<f64>,
    /// DDIM steps of the sample grid written at each validation.
    pub sample_steps: usize,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            batch_size: 8,
            n_epochs: 10,
            eval_freq: 1,
            seed: 42,
            checkpoint_every: 200,
            log_every: 10,
            adv_start: 0,
            context_dropout: 0.1,
            scale_factor: None,
            sample_steps: 20,
        }
    }
}

/// Files of a run directory.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("cannot create run directory {}", root.display()))?;
        Ok(Self { root: root.to_path_buf() })
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint.safetensors")
    }
    pub fn best(&self) -> PathBuf {
        self.root.join("best_model.safetensors")
    }
    pub fn final_model(&self) -> PathBuf {
        self.root.join("final_model.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// Appends one JSON line to `metrics.jsonl`.
    pub fn log(&self, record: &serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.metrics())
            .with_context(|| format!("cannot open {}", self.metrics().display()))?;
        writeln!(f, "{record}").with_context(|| format!("cannot write {}", self.metrics().display()))
    }

    /// The metrics logged so far (for the loss curve, and to cut the log back on resume).
    pub fn read_log(&self) -> Result<Vec<serde_json::Value>> {
        let p = self.metrics();
        if !p.exists() {
            return Ok(Vec::new());
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
    }

    /// Drops log lines written after `step` (a run killed after its last checkpoint logged steps
    /// that the resumed run will log again).
    pub fn truncate_log(&self, step: u64) -> Result<()> {
        let kept: Vec<_> =
            self.read_log()?.into_iter().filter(|r| r["step"].as_u64().is_none_or(|s| s <= step)).collect();
        let text: String = kept.iter().map(|r| format!("{r}\n")).collect();
        crate::io::atomic::write_bytes(&self.metrics(), text.as_bytes())
    }
}

/// Seeds libtorch's generator for one step's draws, from the run seed and the step: a resumed
/// run draws exactly what the uninterrupted run drew.
pub fn seed_step(seed: u64, step: u64) {
    let mixed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    tch::manual_seed((mixed >> 1) as i64);
}

/// Set by Ctrl-C; the loops save a checkpoint and stop at the next step.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        // A second handler cannot be installed (tests call this more than once): ignore that.
        let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
        flag
    })
    .clone()
}

pub fn check_finite(what: &str, v: f64, step: u64) -> Result<()> {
    if !v.is_finite() {
        bail!("{what} is {v} at step {step}: stopping; the last checkpoint is kept");
    }
    Ok(())
}

/// A loss-curve PNG: each series (name, points (x, y)) a line, y on a log scale, white background.
pub fn save_curves(path: &Path, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let (w, h, margin) = (640u32, 400u32, 40u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).filter(|p| p.1 > 0.0).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1.ln()), a.1.max(p.1.ln())));
    let sx = |x: f64| margin as f64 + (x - x0) / (x1 - x0).max(1e-12) * (w - 2 * margin) as f64;
    let sy = |y: f64| (h - margin) as f64 - (y.ln() - y0) / (y1 - y0).max(1e-12) * (h - 2 * margin) as f64;
    for x in margin..w - margin {
        img.put_pixel(x, h - margin, image::Rgb([0, 0, 0]));
    }
    for y in margin..=h - margin {
        img.put_pixel(margin, y, image::Rgb([0, 0, 0]));
    }
    let colours = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75]];
    for (k, (_, s)) in series.iter().enumerate() {
        let col = image::Rgb(colours[k % colours.len()]);
        let s: Vec<&(f64, f64)> = s.iter().filter(|p| p.1 > 0.0).collect();
        for pair in s.windows(2) {
            let (a, b) = ((sx(pair[0].0), sy(pair[0].1)), (sx(pair[1].0), sy(pair[1].1)));
            let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
            for i in 0..=n {
                let t = i as f64 / n as f64;
                let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
                if x >= 0.0 && y >= 0.0 && (x as u32) < w && (y as u32) < h {
                    img.put_pixel(x as u32, y as u32, col);
                }
            }
        }
        // A legend swatch per series, top right.
        for dx in 0..12 {
            for dy in 0..4 {
                img.put_pixel(w - margin - 12 + dx, margin / 2 + 8 * k as u32 + dy, col);
            }
        }
    }
    crate::io::png::save_image(path, &image::DynamicImage::ImageRgb8(img))
}
