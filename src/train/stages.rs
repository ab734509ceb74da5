//! `medgen train aekl|ldm|controlnet`: the reference's three training loops (reference-repo.md
//! §3.5-3.7) around the step functions of `aekl.rs` and `diffusion.rs`, with checkpoints that
//! resume exactly, validation, best/final weights, metrics and pictures.
//!
//! Exact resume rests on three things: a checkpoint holds every weight, buffer and optimiser
//! moment; every random draw of a step is seeded from (seed, step) (`run::seed_step`); the data
//! loader's order and augmentations are functions of (seed, epoch, row). A run resumed from any
//! checkpoint therefore computes what the uninterrupted run computed, bit for bit on CPU.
use super::aekl::{aekl_eval, aekl_step, AeklLossWeights, AeklModels, AeklOptimizers};
use super::checkpoint::{Checkpoint, TrainState};
use super::diffusion::{diffusion_loss, diffusion_step, ControlInput};
use super::grad_scaler::GradScaler;
use super::init::build_on_cpu;
use super::optim::{Adam, AdamConfig};
use super::run::{check_finite, interrupt_flag, save_curves, seed_step, RunDir, TrainSettings};
use crate::amp::Precision;
use crate::checkpoint::{load_model, load_strict, StateDict};
use crate::config::{self, model_params, read_json};
use crate::data::augment::AugmentConfig;
use crate::data::loader::{lists_volumes, read_list, Batch, DataLoader, LoaderConfig};
use crate::distributed;
use crate::io::png::save_grid;
use crate::losses::adversarial::PatchAdversarialLoss;
use crate::losses::perceptual::{PerceptualLoss, PerceptualLossConfig};
use crate::nets::patch_discriminator::{PatchDiscriminator, PatchDiscriminatorConfig};
use crate::nets::{AutoencoderKL, AutoencoderKLConfig, ControlNet, DiffusionModelUNet};
use crate::sampling::{decode_latent, sample_latent, Control, TextConditioning};
use crate::schedulers::{self, NoiseSchedule, SchedulerConfig, SchedulerKind};
use crate::text::context::PromptContexts;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// `eprintln!` on rank 0 only: the replicas of a data-parallel job would all say the same.
macro_rules! say {
    ($($t:tt)*) => {
        if distributed::is_main() {
            eprintln!($($t)*)
        }
    };
}

/// What a training run is given besides its config.
#[derive(Debug, Clone)]
pub struct TrainInputs {
    pub config: PathBuf,
    /// A directory with `train.tsv` and `validation.tsv` (what `medgen preprocess` writes).
    pub data: PathBuf,
    pub run: PathBuf,
    pub resume: bool,
    pub device: Device,
    pub precision: Precision,
    /// LDM/ControlNet: the trained AutoencoderKL (config, weights).
    pub stage1: Option<(PathBuf, PathBuf)>,
    /// ControlNet: the trained LDM UNet (config, weights).
    pub ldm: Option<(PathBuf, PathBuf)>,
    /// LDM/ControlNet with a conditioned UNet: a context file (`medgen encode-prompt`).
    pub context: Option<PathBuf>,
    /// Where `make setup` put the Python packages (the LPIPS lin heads are read from the lpips wheel).
    pub venv: PathBuf,
    /// Stop after this many optimiser steps (checkpoint written), as if interrupted.
    pub max_steps: Option<u64>,
}

fn settings(cfg: &Value, path: &Path) -> Result<TrainSettings> {
    match cfg.get("train") {
        Some(t) => {
            serde_json::from_value(t.clone()).with_context(|| format!("{}: invalid `train` section", path.display()))
        }
        None => Ok(TrainSettings::default()),
    }
}

fn lists(data: &Path) -> Result<(Vec<crate::data::loader::PairRecord>, Vec<crate::data::loader::PairRecord>)> {
    let train = read_list(&data.join("train.tsv"))?;
    let val = read_list(&data.join("validation.tsv"))?;
    ensure!(!train.is_empty(), "{}: the training list is empty", data.join("train.tsv").display());
    Ok((train, val))
}

/// The state dict of a store, for a checkpoint part.
fn store_dict(vs: &VarStore) -> StateDict {
    let mut sd = StateDict::new();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in vars {
        sd.insert(k, v.detach().copy());
    }
    sd
}

/// Safetensors metadata key of the latent scale factor an LDM was trained with: the ControlNet
/// stage and sampling must use the same one.
pub const META_SCALE_FACTOR: &str = "medgen.scale_factor";
/// Safetensors metadata keys of the crop the training PNGs were cut with (`medgen preprocess
/// --crop` and `--slices`): whole-volume translation applies the same one.
pub const META_CROP: &str = "medgen.crop";
pub const META_SLICES: &str = "medgen.slices";

/// What the weights record of the training data: its crop, when `medgen preprocess` wrote the
/// data directory (its summary says); nothing for hand-made lists, and a note when the summary
/// cannot be read (training goes on; sampling then falls back to the reference crop and says so).
fn data_metadata(data: &Path) -> std::collections::BTreeMap<String, String> {
    let mut meta = std::collections::BTreeMap::new();
    match crate::data::preprocess::Crop::of_data(data) {
        Ok(Some(crop)) => {
            meta.insert(META_CROP.to_string(), crop.in_plane());
            meta.insert(META_SLICES.to_string(), crop.slices.to_string());
        }
        Ok(None) => {}
        Err(e) => say!("note: the weights will record no training crop: {e:#}"),
    }
    meta
}

fn save_weights(
    vs: &VarStore,
    path: &Path,
    stage: &str,
    cfg_json: &str,
    scale_factor: Option<f64>,
    data_meta: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let mut meta = data_meta.clone();
    if let Some(f) = scale_factor {
        meta.insert(META_SCALE_FACTOR.to_string(), format!("{f:?}"));
    }
    meta.insert("medgen.model".to_string(), stage.to_string());
    meta.insert("medgen.generation".to_string(), "monai".to_string());
    meta.insert("medgen.train_config".to_string(), cfg_json.to_string());
    store_dict(vs).save_safetensors(path, &meta)
}

/// The loop every stage runs: epochs of batches, a step function, validation every `eval_freq`
/// epochs, checkpoints, interruption, resume.
struct Looper<'a> {
    run: RunDir,
    settings: TrainSettings,
    stage: &'static str,
    cfg_json: String,
    /// `data_metadata` of the run's data directory, for the weights files.
    data_meta: std::collections::BTreeMap<String, String>,
    inputs: &'a TrainInputs,
    state: TrainState,
}

impl<'a> Looper<'a> {
    fn new(inputs: &'a TrainInputs, stage: &'static str, cfg: &Value) -> Result<Self> {
        let run = RunDir::create(&inputs.run)?;
        let settings = settings(cfg, &inputs.config)?;
        let state = TrainState { stage: stage.to_string(), ..Default::default() };
        let data_meta = data_metadata(&inputs.data);
        Ok(Self { run, settings, stage, cfg_json: cfg.to_string(), data_meta, inputs, state })
    }

    /// Loads the checkpoint when resuming; `None` on a fresh start.
    fn resume(&mut self) -> Result<Option<Checkpoint>> {
        let path = self.run.checkpoint();
        if !self.inputs.resume {
            if path.exists() {
                bail!("{} exists: pass --resume to continue that run, or choose another --run", path.display());
            }
            return Ok(None);
        }
        if !path.exists() {
            say!("no checkpoint in {}: starting from scratch", self.run.root.display());
            return Ok(None);
        }
        let ck = Checkpoint::load(&path)?;
        ensure!(
            ck.state.stage == self.stage,
            "{} is a `{}` checkpoint, not `{}`",
            path.display(),
            ck.state.stage,
            self.stage
        );
        ensure!(
            ck.config == self.cfg_json,
            "{}: the run's config changed since the checkpoint; resuming would not continue the same run",
            path.display()
        );
        self.state = ck.state.clone();
        if distributed::is_main() {
            self.run.truncate_log(self.state.step)?;
        }
        say!("resuming {} at epoch {} step {}", self.stage, self.state.epoch, self.state.step);
        Ok(Some(ck))
    }

    /// Rank 0 writes; the other replicas hold the same state.
    fn save(&self, parts: Vec<(&str, StateDict)>) -> Result<()> {
        if !distributed::is_main() {
            return Ok(());
        }
        let mut ck = Checkpoint { state: self.state.clone(), config: self.cfg_json.clone(), ..Default::default() };
        for (name, sd) in parts {
            ck.parts.insert(name.to_string(), sd);
        }
        ck.save(&self.run.checkpoint())
    }

    fn log(&self, split: &str, values: Value) -> Result<()> {
        self.log_at(split, self.state.epoch, self.state.step, values)
    }

    fn log_at(&self, split: &str, epoch: u64, step: u64, values: Value) -> Result<()> {
        if !distributed::is_main() {
            return Ok(());
        }
        let mut rec = json!({"stage": self.stage, "split": split, "epoch": epoch, "step": step});
        if let (Some(r), Some(v)) = (rec.as_object_mut(), values.as_object()) {
            r.extend(v.clone());
        }
        self.run.log(&rec)
    }

    /// The loss curves of the run so far, one series per logged quantity of each split.
    fn plot(&self, keys: &[&str]) -> Result<()> {
        if !distributed::is_main() {
            return Ok(());
        }
        let log = self.run.read_log()?;
        let mut series = Vec::new();
        for split in ["train", "val"] {
            for k in keys {
                let pts: Vec<(f64, f64)> = log
                    .iter()
                    .filter(|r| r["split"] == split)
                    .filter_map(|r| Some((r["step"].as_f64()?, r[*k].as_f64()?)))
                    .collect();
                if !pts.is_empty() {
                    series.push((format!("{split} {k}"), pts));
                }
            }
        }
        save_curves(&self.run.root.join("loss_curve.png"), &series)
    }

    fn bar(&self, n: u64) -> indicatif::ProgressBar {
        if !distributed::is_main() {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(n);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {wide_bar} {pos}/{len} samples [{elapsed}<{eta}, {per_sec}] {msg}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(format!("{} epoch {}", self.stage, self.state.epoch));
        bar
    }
}

/// The named 0-d loss tensors of one step (`loss` first), still on the device.
type StepLosses = Vec<(&'static str, Tensor)>;

/// Training losses not yet read from the device, with the epoch and step they were logged at.
#[derive(Default)]
struct PendingLosses(Vec<(u64, u64, StepLosses)>);

impl PendingLosses {
    fn push(&mut self, epoch: u64, step: u64, losses: StepLosses) {
        // Detached: a pending loss must not keep its step's graph alive.
        self.0.push((epoch, step, losses.into_iter().map(|(k, t)| (k, t.detach())).collect()));
    }

    /// Reads every pending loss in one copy to the host (the one device sync of a logging interval),
    /// writes their `metrics.jsonl` lines, shows the last loss on the bar, and stops the run at the
    /// first non-finite loss (with several processes, at anyone's). Called before every checkpoint,
    /// so a checkpoint never holds the weights of a step whose loss was not checked.
    fn flush(&mut self, l: &Looper, bar: &indicatif::ProgressBar) -> Result<()> {
        let flat: Vec<Tensor> =
            self.0.iter().flat_map(|(_, _, v)| v.iter().map(|(_, t)| t.to_kind(Kind::Double).reshape([1]))).collect();
        let values = if flat.is_empty() {
            Vec::new()
        } else {
            Vec::<f64>::try_from(Tensor::cat(&flat, 0).to_device(Device::Cpu))?
        };
        let mut values = values.into_iter();
        let mut bad: Option<(f64, u64)> = None;
        let mut last = None;
        for (epoch, step, named) in self.0.drain(..) {
            let mut rec = serde_json::Map::new();
            for (k, _) in &named {
                rec.insert(k.to_string(), json!(values.next().context("a pending loss without its value")?));
            }
            let loss = rec.get("loss").and_then(Value::as_f64).unwrap_or(f64::NAN);
            if !loss.is_finite() && bad.is_none() {
                bad = Some((loss, step));
            }
            last = Some(loss);
            l.log_at("train", epoch, step, Value::Object(rec))?;
        }
        if let Some(loss) = last {
            bar.set_message(format!("loss {loss:.4}"));
        }
        let bad = if distributed::world_size() > 1 {
            let any = distributed::sum_across(&[bad.is_some() as u8 as f64])?[0] > 0.0;
            if any {
                Some(bad.unwrap_or((f64::NAN, l.state.step)))
            } else {
                None
            }
        } else {
            bad
        };
        match bad {
            Some((loss, step)) => check_finite("the training loss", loss, step),
            None => Ok(()),
        }
    }
}

/// Runs the epochs. `step` trains one batch and returns its losses, still on the device: they are
/// read (and `metrics.jsonl` written, a non-finite loss detected) every `log_every` steps and before
/// each checkpoint, not at every step. `validate` returns this process's validation loss total and
/// sample count (summed over the processes here) and writes the picture; `parts` snapshots the
/// state for a checkpoint. With several processes every decision to stop (Ctrl-C, `max_steps`, a
/// non-finite loss) is taken together, so no replica is left waiting.
#[allow(clippy::type_complexity)]
fn run_epochs(
    l: &mut Looper,
    loader: &DataLoader,
    step: &mut dyn FnMut(&Batch, u64) -> Result<StepLosses>,
    validate: &mut dyn FnMut(u64) -> Result<(f64, f64)>,
    parts: &dyn Fn() -> Result<Vec<(&'static str, StateDict)>>,
    weights: &dyn Fn(&Path) -> Result<()>,
    loss_keys: &[&str],
) -> Result<()> {
    let interrupted = interrupt_flag();
    let per_epoch = loader.num_batches() as u64;
    let world = distributed::world_size() as u64;
    let seed = rank_seed(l.settings.seed);
    let mut done_in_epoch =
        l.state.batches_in_epoch.unwrap_or_else(|| l.state.step.saturating_sub(l.state.epoch * per_epoch));
    let saved_world = l.state.world_size.unwrap_or(1);
    if saved_world != world && done_in_epoch > 0 {
        // The samples seen so far in this epoch, in batches of the new job (rounded down: a few may be seen twice).
        let seen = done_in_epoch * saved_world;
        done_in_epoch = seen / world;
        if distributed::is_main() {
            eprintln!(
                "the checkpoint was written by {saved_world} process(es), this job has {world}: \
                 epoch {} continues after {done_in_epoch} batches per process",
                l.state.epoch
            );
        }
    }
    l.state.world_size = Some(world);
    let mut pending = PendingLosses::default();
    while l.state.epoch < l.settings.n_epochs {
        let epoch = l.state.epoch;
        let bar = l.bar(loader.len() as u64);
        bar.set_position((done_in_epoch * l.settings.batch_size as u64).min(loader.len() as u64));
        for (i, batch) in loader.epoch(epoch).into_iter().enumerate() {
            // Checked before skipping: a resumed epoch must not end early on a batch it skips.
            let batch = batch?;
            if (i as u64) < done_in_epoch {
                continue; // trained before the checkpoint this run resumed from
            }
            seed_step(seed, l.state.step);
            let losses = step(&batch, epoch)?;
            l.state.step += 1;
            done_in_epoch += 1;
            l.state.batches_in_epoch = Some(done_in_epoch);
            pending.push(epoch, l.state.step, losses);
            bar.inc(batch.rows.len() as u64);
            let stop = interrupted.load(Ordering::SeqCst) || l.inputs.max_steps.is_some_and(|m| l.state.step >= m);
            let stop = if world > 1 { distributed::sum_across(&[stop as u8 as f64])?[0] > 0.0 } else { stop };
            let checkpoint = l.state.step.is_multiple_of(l.settings.checkpoint_every.max(1)) || stop;
            if checkpoint || pending.0.len() as u64 >= l.settings.log_every.max(1) {
                pending.flush(l, &bar)?;
            }
            if checkpoint {
                l.save(parts()?)?;
            }
            if stop {
                bar.abandon_with_message("interrupted: checkpoint saved");
                if distributed::is_main() {
                    eprintln!("stopped at step {}; continue with --resume", l.state.step);
                }
                return Ok(());
            }
        }
        pending.flush(l, &bar)?;
        bar.finish();
        l.state.epoch += 1;
        done_in_epoch = 0;
        l.state.batches_in_epoch = Some(0);
        if l.state.epoch.is_multiple_of(l.settings.eval_freq.max(1)) || l.state.epoch == l.settings.n_epochs {
            let (total, n) = validate(l.state.epoch)?;
            let sums = distributed::sum_across(&[total, n])?;
            let val = if sums[1] > 0.0 { sums[0] / sums[1] } else { f64::NAN };
            l.log("val", json!({"loss": val}))?;
            if l.state.best_val_loss.is_none_or(|b| val <= b) {
                l.state.best_val_loss = Some(val);
                if distributed::is_main() {
                    weights(&l.run.best())?;
                }
            }
            l.plot(loss_keys)?;
            if distributed::is_main() {
                eprintln!("{} epoch {}: validation loss {val:.5}", l.stage, l.state.epoch);
            }
        }
        l.save(parts()?)?;
    }
    if distributed::is_main() {
        weights(&l.run.final_model())?;
    }
    l.plot(loss_keys)?;
    // Nobody leaves before rank 0 has written the final weights.
    if let Some(g) = distributed::group() {
        g.barrier()?;
    }
    Ok(())
}

/// The seed of this process's random draws (noise, timesteps): the run's seed on rank 0, so a lone
/// process draws what it always drew; another stream on each other rank, so replicas do not noise
/// their different images identically.
fn rank_seed(seed: u64) -> u64 {
    match distributed::rank() as u64 {
        0 => seed,
        r => seed ^ r.wrapping_mul(0xD1B5_4A32_D192_ED03),
    }
}

/// Rank 0's weights in every replica before training starts (as DDP does).
fn sync_replicas(stores: &[&VarStore]) -> Result<()> {
    if distributed::world_size() == 1 {
        return Ok(());
    }
    let mut vars: Vec<(String, Tensor)> = stores.iter().flat_map(|vs| vs.variables()).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors: Vec<Tensor> = vars.into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| distributed::broadcast_from_main(&tensors))
}

fn train_loader(
    records: Vec<crate::data::loader::PairRecord>,
    s: &TrainSettings,
    augment: AugmentConfig,
    flair: bool,
    dropout: f64,
) -> Result<DataLoader> {
    // The reference's augmentations are 2-D; the 3-D bundles train without spatial augmentation too.
    let augment = if lists_volumes(&records)? {
        say!("note: the training list names NIfTI volumes: they are not augmented (the augmentations are 2-D)");
        None
    } else {
        Some(augment)
    };
    DataLoader::new(
        records,
        LoaderConfig {
            batch_size: s.batch_size,
            shuffle: true,
            drop_last: false,
            augment,
            with_flair: flair,
            context_dropout: dropout,
            seed: s.seed,
            prefetch: 2,
            shard: shard(),
        },
    )
}

/// This process's shard of a list, in a data-parallel job.
fn shard() -> Option<(usize, usize)> {
    (distributed::world_size() > 1).then(|| (distributed::rank(), distributed::world_size()))
}

fn val_loader(
    records: Vec<crate::data::loader::PairRecord>,
    s: &TrainSettings,
    flair: bool,
) -> Result<Option<DataLoader>> {
    if records.is_empty() {
        return Ok(None);
    }
    let cfg = LoaderConfig {
        batch_size: s.batch_size,
        shuffle: false,
        with_flair: flair,
        seed: s.seed,
        shard: shard(),
        ..Default::default()
    };
    Ok(Some(DataLoader::new(records, cfg)?))
}

/// The latent of a `(batch, channels, spatial...)` image batch.
fn batch_latent_shape(cfg: &AutoencoderKLConfig, batch: &[i64]) -> Vec<i64> {
    [&batch[..1], &cfg.latent_shape(&batch[2..])[..]].concat()
}

fn lr(cfg: &Value, section: &str, key: &str, path: &Path) -> Result<f64> {
    cfg.get(section)
        .and_then(|s| s.get(key))
        .and_then(|v| v.as_f64())
        .with_context(|| format!("{}: `{section}.{key}` is missing", path.display()))
}

/// The AutoencoderKL stage.
pub fn train_aekl(inputs: &TrainInputs) -> Result<()> {
    let cfg = read_json(&inputs.config)?;
    let mut l = Looper::new(inputs, "aekl", &cfg)?;
    let s = l.settings.clone();
    let dev = inputs.device;
    let ae_cfg = config::aekl_config(&inputs.config)?;
    let w: AeklLossWeights = serde_json::from_value(cfg["stage1"].clone()).with_context(|| {
        format!("{}: stage1 needs perceptual_weight, kl_weight, adv_weight", inputs.config.display())
    })?;
    let d_cfg: PatchDiscriminatorConfig = serde_json::from_value(model_params(&cfg, "discriminator"))
        .with_context(|| format!("{}: invalid discriminator parameters", inputs.config.display()))?;
    let perceptual = if w.perceptual_weight > 0.0 {
        let p: PerceptualLossConfig = serde_json::from_value(model_params(&cfg, "perceptual_network"))
            .with_context(|| format!("{}: invalid perceptual_network parameters", inputs.config.display()))?;
        Some(PerceptualLoss::new(&p.with_wheel_lin_weights(&inputs.venv)?, dev)?)
    } else {
        None
    };
    tch::manual_seed(s.seed as i64);
    let (ae_vs, ae) =
        build_on_cpu(dev, |vs| AutoencoderKL::new(&vs.root(), &ae_cfg, crate::checkpoint::Generation::Monai))?;
    let (d_vs, disc) = build_on_cpu(dev, |vs| PatchDiscriminator::new(&vs.root(), &d_cfg))?;
    let mut o = AeklOptimizers {
        g: Adam::from_var_store(AdamConfig::adam(lr(&cfg, "stage1", "base_lr", &inputs.config)?), &ae_vs)?,
        d: Adam::from_var_store(AdamConfig::adam(lr(&cfg, "stage1", "disc_lr", &inputs.config)?), &d_vs)?,
        scaler_g: GradScaler::for_precision(inputs.precision)?,
        scaler_d: GradScaler::for_precision(inputs.precision)?,
    };
    if let Some(ck) = l.resume()? {
        load_strict(&ae_vs, ck.part("model.autoencoder")?)?;
        load_strict(&d_vs, ck.part("model.discriminator")?)?;
        o.g.load_state(ck.part("optim.g")?, "optim")?;
        o.d.load_state(ck.part("optim.d")?, "optim")?;
        load_scaler(&mut o.scaler_g, ck.part("optim.g")?)?;
        load_scaler(&mut o.scaler_d, ck.part("optim.d")?)?;
    }
    sync_replicas(&[&ae_vs, &d_vs])?;
    let adversarial = PatchAdversarialLoss::reference();
    let models = AeklModels {
        autoencoder: &ae,
        discriminator: &disc,
        perceptual: perceptual.as_ref(),
        adversarial: &adversarial,
    };
    let (train, val) = lists(&inputs.data)?;
    let loader = train_loader(train, &s, AugmentConfig::autoencoder(), false, 0.0)?;
    let val = val_loader(val, &s, false)?;
    let latent_shape = |b: &Tensor| batch_latent_shape(&ae_cfg, &b.size());
    let opts = std::cell::RefCell::new(o);
    let precision = inputs.precision;
    let mut step = |b: &Batch, epoch: u64| -> Result<Vec<(&'static str, Tensor)>> {
        let images = b.t1w.to_device(dev);
        let eps = Tensor::randn(latent_shape(&images), (Kind::Float, Device::Cpu)).to_device(dev);
        let o = &mut *opts.borrow_mut();
        let losses = aekl_step(&models, o, precision, &images, &eps, &w, epoch >= s.adv_start)?;
        Ok(losses.named())
    };
    let run_root = l.run.root.clone();
    let mut validate = |epoch: u64| -> Result<(f64, f64)> {
        let Some(v) = &val else { return Ok((0.0, 0.0)) };
        // Summed on the device in float64, read once.
        let mut total = Tensor::zeros([], (Kind::Double, dev));
        let mut n = 0usize;
        let mut last = None;
        for (i, b) in v.epoch(0).into_iter().enumerate() {
            let b = b?;
            let images = b.t1w.to_device(dev);
            seed_step(s.seed ^ 0x7A11, i as u64);
            let eps = Tensor::randn(latent_shape(&images), (Kind::Float, Device::Cpu)).to_device(dev);
            let losses = aekl_eval(&models, precision, &images, &eps, &w)?;
            total += losses.l1.to_kind(Kind::Double) * b.rows.len() as f64;
            n += b.rows.len();
            last = Some(images);
        }
        let total = f64::try_from(total)?;
        if let Some(images) = last.filter(|_| distributed::is_main()) {
            let k = images.size()[0].min(4);
            let x = images.narrow(0, 0, k);
            let rec = tch::no_grad(|| ae.reconstruct(&x))?;
            save_grid(&run_root.join(format!("reconstructions_epoch{epoch:04}.png")), &Tensor::cat(&[x, rec], 0), k)?;
        }
        Ok((total, n as f64))
    };
    let parts = || -> Result<Vec<(&'static str, StateDict)>> {
        let o = &*opts.borrow();
        let (mut og, mut od) = (StateDict::new(), StateDict::new());
        o.g.save_state(&mut og, "optim").context("saving the generator's optimiser state")?;
        o.d.save_state(&mut od, "optim").context("saving the discriminator's optimiser state")?;
        o.scaler_g.save_state(&mut og, "scaler").context("saving the generator's loss scaler")?;
        o.scaler_d.save_state(&mut od, "scaler").context("saving the discriminator's loss scaler")?;
        Ok(vec![
            ("model.autoencoder", store_dict(&ae_vs)),
            ("model.discriminator", store_dict(&d_vs)),
            ("optim.g", og),
            ("optim.d", od),
        ])
    };
    let (cfg_json, data_meta) = (l.cfg_json.clone(), l.data_meta.clone());
    let weights = |p: &Path| save_weights(&ae_vs, p, "aekl", &cfg_json, None, &data_meta);
    run_epochs(&mut l, &loader, &mut step, &mut validate, &parts, &weights, &["loss", "l1", "p_loss", "d_loss"])
}

/// A loss scaler's state from a checkpoint part. A run checkpointed without loss scaling and
/// resumed in fp16 starts its scaler afresh (and says so); the reverse ignores the saved scale.
fn load_scaler(scaler: &mut GradScaler, part: &StateDict) -> Result<()> {
    let saved_enabled = part.metadata.get("scaler.enabled").map(String::as_str) == Some("true");
    if scaler.is_enabled() && !saved_enabled {
        say!("the checkpoint was trained without loss scaling: the fp16 loss scaler starts at its initial scale");
        return Ok(());
    }
    scaler.load_state(part, "scaler")
}

/// The trained autoencoder of a later stage, frozen.
fn load_stage1(inputs: &TrainInputs) -> Result<crate::checkpoint::Loaded<AutoencoderKL>> {
    let (cfg_path, weights) = inputs
        .stage1
        .as_ref()
        .context("this stage needs the trained AutoencoderKL: --stage1-config and --stage1-weights")?;
    let cfg = config::aekl_config(cfg_path)?;
    let mut l = load_model(StateDict::load(weights, None)?, inputs.device, |p, g| AutoencoderKL::new(p, &cfg, g))
        .with_context(|| format!("{} does not fit {}", weights.display(), cfg_path.display()))?;
    l.vs.freeze();
    Ok(l)
}

/// The prompt contexts of a conditioned UNet: the first prompt for every sample, the null
/// prompt where the loader drops it.
fn contexts(inputs: &TrainInputs, cross_attention_dim: Option<i64>) -> Result<Option<PromptContexts>> {
    match (cross_attention_dim, &inputs.context) {
        (None, None) => Ok(None),
        (None, Some(_)) => bail!("the UNet is unconditioned (with_conditioning false): it takes no --context"),
        (Some(_), None) => {
            bail!("the UNet is conditioned: give a context file (--context, from `medgen encode-prompt`)")
        }
        (Some(d), Some(p)) => {
            let c = PromptContexts::load(p, inputs.device)?;
            ensure!(c.width() == d, "{}: context width {} but cross_attention_dim {d}", p.display(), c.width());
            Ok(Some(c))
        }
    }
}

fn batch_context(c: &Option<PromptContexts>, drop: &[bool]) -> Option<Tensor> {
    let c = c.as_ref()?;
    let rows: Vec<Tensor> = drop.iter().map(|&d| if d { c.null_context.get(0) } else { c.context.get(0) }).collect();
    Some(Tensor::stack(&rows, 0))
}

/// 1/std of the encoded latents of up to 4 training batches (the MONAI tutorials' rule).
fn compute_scale_factor(ae: &AutoencoderKL, loader: &DataLoader, seed: u64, dev: Device) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut zs = Vec::new();
    for (i, b) in loader.epoch(0).into_iter().take(4).enumerate() {
        seed_step(seed ^ 0x5CA1E, i as u64);
        zs.push(ae.encode_stage_2_inputs(&b?.t1w.to_device(dev))?.flatten(0, -1));
    }
    let std = f64::try_from(Tensor::cat(&zs, 0).std(true))?;
    ensure!(std > 0.0 && std.is_finite(), "the encoded latents have std {std}: cannot compute a scale factor");
    Ok(1.0 / std)
}

/// The LDM stage (`control == false`) and the ControlNet stage.
fn train_diffusion(inputs: &TrainInputs, controlnet_stage: bool) -> Result<()> {
    let cfg = read_json(&inputs.config)?;
    let stage = if controlnet_stage { "controlnet" } else { "ldm" };
    let mut l = Looper::new(inputs, stage, &cfg)?;
    let s = l.settings.clone();
    let dev = inputs.device;
    let ae = load_stage1(inputs)?;
    let sched_cfg: SchedulerConfig = config::scheduler_config(&inputs.config, SchedulerKind::Ddpm)?;
    let schedule = NoiseSchedule::from_config(&sched_cfg)?;
    let prediction = sched_cfg.prediction_type;
    tch::manual_seed(s.seed as i64);
    // The UNet: trained here (LDM), or loaded from the LDM run and frozen (ControlNet).
    let (unet_vs, unet, unet_cfg) = if controlnet_stage {
        let (cp, wp) = inputs
            .ldm
            .as_ref()
            .context("the ControlNet stage needs the trained LDM: --ldm-config and --ldm-weights")?;
        let ucfg = config::unet_config(cp)?;
        let mut loaded = load_model(StateDict::load(wp, None)?, dev, |p, g| DiffusionModelUNet::new(p, &ucfg, g))?;
        loaded.vs.freeze();
        (loaded.vs, loaded.model, ucfg)
    } else {
        let ucfg = config::unet_config(&inputs.config)?;
        let (vs, unet) =
            build_on_cpu(dev, |vs| DiffusionModelUNet::new(&vs.root(), &ucfg, crate::checkpoint::Generation::Monai))?;
        (vs, unet, ucfg)
    };
    let cn = if controlnet_stage {
        let ccfg = config::controlnet_config(&inputs.config)?;
        ccfg.matches_unet(&unet_cfg)?;
        let (_, wp) = inputs.ldm.as_ref().expect("checked above");
        // Copied from the UNet on the CPU too: one move of the whole store afterwards.
        let (vs, (net, report)) = build_on_cpu(dev, |vs| {
            let net = ControlNet::new(&vs.root(), &ccfg, crate::checkpoint::Generation::Monai)?;
            Ok((net, ControlNet::init_from_unet(vs, StateDict::load(wp, None)?)?))
        })?;
        say!(
            "ControlNet initialised from the UNet: {} tensors copied, {} kept",
            report.copied.len(),
            report.missing.len()
        );
        Some((vs, net))
    } else {
        None
    };
    let trained_vs = cn.as_ref().map_or(&unet_vs, |c| &c.0);
    let section = if controlnet_stage { "controlnet" } else { "ldm" };
    let mut opt = Adam::from_var_store(AdamConfig::adamw(lr(&cfg, section, "base_lr", &inputs.config)?), trained_vs)?;
    let ctx = contexts(inputs, unet_cfg.cross_attention_dim)?;
    let (train, val) = lists(&inputs.data)?;
    let dropout = if ctx.is_some() { s.context_dropout } else { 0.0 };
    let loader = train_loader(train, &s, AugmentConfig::diffusion(), controlnet_stage, dropout)?;
    let val = val_loader(val, &s, controlnet_stage)?;
    let resumed = l.resume()?;
    // The ControlNet works in the trained LDM's latent space: its scale factor, recorded in the LDM's weights.
    let ldm_scale_factor = match (&inputs.ldm, controlnet_stage) {
        (Some((_, wp)), true) => StateDict::load(wp, None)?
            .metadata
            .get(META_SCALE_FACTOR)
            .map(|v| v.parse::<f64>().with_context(|| format!("{}: bad {META_SCALE_FACTOR} {v:?}", wp.display())))
            .transpose()?,
        _ => None,
    };
    let scale_factor = match (&resumed, s.scale_factor, ldm_scale_factor) {
        (Some(ck), _, _) => *ck.state.extra.get("scale_factor").context("the checkpoint lacks its scale_factor")?,
        (None, Some(f), Some(g)) if f != g => {
            bail!("the config's scale_factor {f} differs from the one the LDM was trained with ({g})")
        }
        (None, Some(f), _) | (None, None, Some(f)) => f,
        (None, None, None) => compute_scale_factor(&ae.model, &loader.unsharded(), s.seed, dev)?,
    };
    l.state.extra.insert("scale_factor".to_string(), scale_factor);
    say!("{stage}: scale factor {scale_factor:.5}");
    let mut scaler = GradScaler::for_precision(inputs.precision)?;
    if let Some(ck) = &resumed {
        load_strict(trained_vs, ck.part("model.trained")?)?;
        opt.load_state(ck.part("optim")?, "optim")?;
        load_scaler(&mut scaler, ck.part("optim")?)?;
    }
    sync_replicas(&[trained_vs])?;
    let opt = std::cell::RefCell::new((opt, scaler));
    // Under CUDA autocast the encoder's `exp` runs in float32 and promotes the posterior sample to float32; CPU
    // autocast leaves it in bf16/fp16. Cast, so the latent and the noise are float32 on every device.
    let latent_of = |images: &Tensor| -> Result<Tensor> {
        Ok(tch::no_grad(|| ae.model.encode_stage_2_inputs(images))?.to_kind(Kind::Float) * scale_factor)
    };
    let loss_of = |b: &Batch, drop: &[bool]| -> Result<Tensor> {
        let images = b.t1w.to_device(dev);
        let latent = latent_of(&images)?;
        let noise = Tensor::randn(latent.size(), (Kind::Float, Device::Cpu)).to_device(dev);
        // Drawn in [0, T) on the CPU: in range by construction, so `add_noise` need not read them back from the device.
        let t = Tensor::randint(schedule.num_train_timesteps(), [latent.size()[0]], (Kind::Int64, Device::Cpu))
            .to_device(dev);
        let context = batch_context(&ctx, drop).map(|c| c.to_device(dev));
        let flair = b.flair.as_ref().map(|f| f.to_device(dev));
        let control = match (&cn, &flair) {
            (Some((_, net)), Some(f)) => Some(ControlInput { controlnet: net, cond: f }),
            _ => None,
        };
        diffusion_loss(&unet, control.as_ref(), &schedule, prediction, &latent, &noise, &t, context.as_ref())
    };
    let precision = inputs.precision;
    let mut step = |b: &Batch, _epoch: u64| -> Result<Vec<(&'static str, Tensor)>> {
        let (o, scaler) = &mut *opt.borrow_mut();
        let loss = diffusion_step(o, scaler, precision, dev, || loss_of(b, &b.drop_context))?;
        Ok(vec![("loss", loss.detach())])
    };
    let run_root = l.run.root.clone();
    let mut validate = |epoch: u64| -> Result<(f64, f64)> {
        let Some(v) = &val else { return Ok((0.0, 0.0)) };
        let _guard = tch::no_grad_guard();
        // Summed on the device in float64, read once.
        let mut total = Tensor::zeros([], (Kind::Double, dev));
        let mut n = 0usize;
        let mut first_flair = None;
        for (i, b) in v.epoch(0).into_iter().enumerate() {
            let b = b?;
            seed_step(s.seed ^ 0x7A11, i as u64);
            let no_drop = vec![false; b.rows.len()];
            let _autocast = precision.autocast(dev);
            total += loss_of(&b, &no_drop)?.to_kind(Kind::Double) * b.rows.len() as f64;
            n += b.rows.len();
            if first_flair.is_none() {
                first_flair = Some((b.t1w.shallow_clone(), b.flair.as_ref().map(|f| f.shallow_clone())));
            }
        }
        let total = f64::try_from(total)?;
        // A few samples from the model (DDIM, no guidance), decoded: people look at these.
        if let Some((t1w, flair)) = first_flair.filter(|_| distributed::is_main()) {
            let k = t1w.size()[0].min(4);
            let mut shape = batch_latent_shape(ae.model.config(), &t1w.size());
            shape[0] = k;
            seed_step(s.seed ^ 0x5A4, epoch);
            let noise = Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(dev);
            let mut sched = schedulers::build(
                SchedulerKind::Ddim,
                &SchedulerConfig { clip_sample: Some(false), ..sched_cfg.clone() },
            )?;
            sched.set_timesteps(s.sample_steps.max(1))?;
            let context = batch_context(&ctx, &vec![false; k as usize]).map(|c| c.to_device(dev));
            let text = match &context {
                Some(c) => TextConditioning::Context(c),
                None => TextConditioning::None,
            };
            let flair_k = flair.map(|f| f.narrow(0, 0, k).to_device(dev));
            let control = match (&cn, &flair_k) {
                (Some((_, net)), Some(fl)) => Some(Control { controlnet: net, cond: fl, conditioning_scale: 1.0 }),
                _ => None,
            };
            let latent =
                sample_latent(&unet, control.as_ref(), sched.as_mut(), &noise, &text, Precision::Fp32, &mut |_, _| {})?;
            let images = decode_latent(&ae.model, &latent, scale_factor, Precision::Fp32)?;
            let mut rows = vec![images.to_device(Device::Cpu)];
            if let Some(fl) = flair_k {
                rows.insert(0, fl.to_device(Device::Cpu));
                rows.push(t1w.narrow(0, 0, k));
            }
            save_grid(&run_root.join(format!("samples_epoch{epoch:04}.png")), &Tensor::cat(&rows, 0), k)?;
        }
        Ok((total, n as f64))
    };
    let parts = || -> Result<Vec<(&'static str, StateDict)>> {
        let mut o = StateDict::new();
        let (opt, scaler) = &*opt.borrow();
        opt.save_state(&mut o, "optim").context("saving the optimiser state")?;
        scaler.save_state(&mut o, "scaler").context("saving the loss scaler")?;
        Ok(vec![("model.trained", store_dict(trained_vs)), ("optim", o)])
    };
    let (cfg_json, data_meta) = (l.cfg_json.clone(), l.data_meta.clone());
    let weights = |p: &Path| save_weights(trained_vs, p, stage, &cfg_json, Some(scale_factor), &data_meta);
    run_epochs(&mut l, &loader, &mut step, &mut validate, &parts, &weights, &["loss"])
}

pub fn train_ldm(inputs: &TrainInputs) -> Result<()> {
    train_diffusion(inputs, false)
}

pub fn train_controlnet(inputs: &TrainInputs) -> Result<()> {
    train_diffusion(inputs, true)
}
