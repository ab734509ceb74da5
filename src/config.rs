//! JSON configs. They mirror the reference YAML files key for key (`stage1.params`,
//! `ldm.params`, ...); a bare parameter object is accepted too.
use crate::nets::{AutoencoderKLConfig, ControlNetConfig, DiffusionModelUNetConfig};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("config {} is not valid JSON", path.display()))
}

/// `root[section].params` when present, else `root.params`, else `root` itself.
pub fn model_params(root: &Value, section: &str) -> Value {
    let sect = root.get(section).unwrap_or(root);
    sect.get("params").unwrap_or(sect).clone()
}

/// The AutoencoderKL parameters of a config file (its `stage1.params`).
pub fn aekl_config(path: &Path) -> Result<AutoencoderKLConfig> {
    let cfg: AutoencoderKLConfig = parse_params(path, "stage1", "AutoencoderKL")?;
    cfg.validate().with_context(|| format!("{}: invalid AutoencoderKL parameters", path.display()))?;
    Ok(cfg)
}

fn parse_params<T: serde::de::DeserializeOwned>(path: &Path, section: &str, what: &str) -> Result<T> {
    let params = model_params(&read_json(path)?, section);
    serde_json::from_value(params).with_context(|| format!("{}: invalid {what} parameters", path.display()))
}

/// The DiffusionModelUNet parameters of a config file (its `ldm.params`).
pub fn unet_config(path: &Path) -> Result<DiffusionModelUNetConfig> {
    let cfg: DiffusionModelUNetConfig = parse_params(path, "ldm", "DiffusionModelUNet")?;
    cfg.validate().with_context(|| format!("{}: invalid DiffusionModelUNet parameters", path.display()))?;
    Ok(cfg)
}

/// The ControlNet parameters of a config file (its `controlnet.params`).
pub fn controlnet_config(path: &Path) -> Result<ControlNetConfig> {
    let cfg: ControlNetConfig = parse_params(path, "controlnet", "ControlNet")?;
    cfg.validate().with_context(|| format!("{}: invalid ControlNet parameters", path.display()))?;
    Ok(cfg)
}

/// The noise scheduler of a config file (`ldm.scheduler`; `controlnet_v0.json` carries it there
/// too), checked against the scheduler kind that will use it.
pub fn scheduler_config(path: &Path, kind: SchedulerKind) -> Result<SchedulerConfig> {
    let root = read_json(path)?;
    let sect = root
        .get("ldm")
        .and_then(|l| l.get("scheduler"))
        .or_else(|| root.get("scheduler"))
        .with_context(|| format!("{}: no `ldm.scheduler` (or top-level `scheduler`) section", path.display()))?;
    let cfg: SchedulerConfig = serde_json::from_value(sect.clone())
        .with_context(|| format!("{}: invalid scheduler parameters", path.display()))?;
    cfg.check_applies_to(kind).with_context(|| format!("{}: invalid scheduler parameters", path.display()))?;
    Ok(cfg)
}

/// The scheduler the reference sampling scripts use (`sampling.scheduler_kind` and
/// `sampling.scheduler`; not in the reference YAML, which holds the training scheduler only).
pub fn sampling_scheduler(path: &Path) -> Result<(SchedulerKind, SchedulerConfig)> {
    let root = read_json(path)?;
    let s = root.get("sampling").with_context(|| format!("{}: no `sampling` section", path.display()))?;
    let kind: SchedulerKind = s
        .get("scheduler_kind")
        .and_then(|k| k.as_str())
        .with_context(|| {
            let kinds: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.as_str()).collect();
            format!("{}: `sampling.scheduler_kind` missing ({})", path.display(), kinds.join(", "))
        })?
        .parse()
        .with_context(|| format!("{}: sampling.scheduler_kind", path.display()))?;
    let params = s.get("scheduler").with_context(|| format!("{}: no `sampling.scheduler`", path.display()))?;
    let cfg: SchedulerConfig = serde_json::from_value(params.clone())
        .with_context(|| format!("{}: invalid sampling scheduler parameters", path.display()))?;
    cfg.check_applies_to(kind).with_context(|| format!("{}: invalid sampling scheduler parameters", path.display()))?;
    Ok((kind, cfg))
}
