//! JSON configs. They mirror the reference YAML files key for key (`stage1.params`,
//! `ldm.params`, ...); a bare parameter object is accepted too.
use crate::nets::AutoencoderKLConfig;
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
    let params = model_params(&read_json(path)?, "stage1");
    let cfg: AutoencoderKLConfig = serde_json::from_value(params)
        .with_context(|| format!("{}: invalid AutoencoderKL parameters", path.display()))?;
    cfg.validate().with_context(|| format!("{}: invalid AutoencoderKL parameters", path.display()))?;
    Ok(cfg)
}
