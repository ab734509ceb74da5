//! Training checkpoints: every piece of state a run needs to continue exactly (the weights of each
//! network, each optimiser's and the loss scaler's state as state dicts, the epoch and step, the
//! config), in one safetensors file written to a temporary name and renamed, so a crash or a
//! SIGKILL at any moment leaves the previous checkpoint intact and loadable.
//!
//! Random numbers are not saved: the training loops seed every draw from (seed, epoch, step) and
//! the data loader from (seed, epoch, row), so a resumed run draws what the uninterrupted run drew.
use crate::checkpoint::StateDict;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const META_STATE: &str = "medgen.train_state";
const META_CONFIG: &str = "medgen.train_config";
/// Bumped when the layout changes, so an old checkpoint is refused with a reason.
const FORMAT_VERSION: u32 = 1;

/// Where a run stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// The stage (`aekl`, `ldm`, `controlnet`).
    pub stage: String,
    /// Epochs completed.
    pub epoch: u64,
    /// Optimiser steps completed.
    pub step: u64,
    pub best_val_loss: Option<f64>,
    /// Anything else a stage needs to continue (e.g. the LDM scale factor).
    pub extra: BTreeMap<String, f64>,
    /// Batches each process has trained in the current epoch (absent in checkpoints written before
    /// data-parallel training: then `step - epoch * batches per epoch`).
    #[serde(default)]
    pub batches_in_epoch: Option<u64>,
    /// Processes that trained this run up to the checkpoint (absent: 1). A resume with another
    /// number continues the epoch where the samples seen so far end.
    #[serde(default)]
    pub world_size: Option<u64>,
}

/// A checkpoint's contents: named parts (`model.unet`, `optim.unet`, `scaler`, ...) and the state.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub parts: BTreeMap<String, StateDict>,
    pub state: TrainState,
    /// The run's config, as JSON, so `--resume` can refuse a changed config.
    pub config: String,
}

impl Checkpoint {
    /// Writes every part under `<part>/<key>` names, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut sd = StateDict::new();
        for (part, dict) in &self.parts {
            if part.contains('/') {
                bail!("checkpoint part name {part:?} must not contain '/'");
            }
            for (k, t) in dict.iter() {
                sd.insert(format!("{part}/{k}"), t.to_device(tch::Device::Cpu));
            }
        }
        let mut meta = BTreeMap::new();
        // A part's own metadata (an optimiser's hyper-parameters) travels under the same prefix.
        for (part, dict) in &self.parts {
            for (k, v) in &dict.metadata {
                meta.insert(format!("{part}/{k}"), v.clone());
            }
        }
        let mut state = self.state.clone();
        state.format_version = FORMAT_VERSION;
        meta.insert(META_STATE.to_string(), serde_json::to_string(&state)?);
        meta.insert(META_CONFIG.to_string(), self.config.clone());
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        sd.save_safetensors(path, &meta)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let sd = StateDict::load(path, None).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let state_json = sd
            .metadata
            .get(META_STATE)
            .with_context(|| format!("{} is not a medgen training checkpoint (no {META_STATE})", path.display()))?;
        let state: TrainState = serde_json::from_str(state_json)
            .with_context(|| format!("{}: unreadable training state", path.display()))?;
        if state.format_version != FORMAT_VERSION {
            bail!(
                "{}: checkpoint format {} (this medgen writes {FORMAT_VERSION})",
                path.display(),
                state.format_version
            );
        }
        let mut parts: BTreeMap<String, StateDict> = BTreeMap::new();
        for (name, t) in sd.iter() {
            let (part, key) =
                name.split_once('/').with_context(|| format!("{}: tensor {name:?} has no part", path.display()))?;
            parts.entry(part.to_string()).or_default().insert(key.to_string(), t.shallow_clone());
        }
        for (k, v) in &sd.metadata {
            if let Some((part, key)) = k.split_once('/') {
                parts.entry(part.to_string()).or_default().metadata.insert(key.to_string(), v.clone());
            }
        }
        let config = sd.metadata.get(META_CONFIG).cloned().unwrap_or_default();
        Ok(Self { parts, state, config })
    }

    /// A part that must be there.
    pub fn part(&self, name: &str) -> Result<&StateDict> {
        self.parts.get(name).with_context(|| {
            format!("the checkpoint has no `{name}` (it holds {:?})", self.parts.keys().collect::<Vec<_>>())
        })
    }
}
