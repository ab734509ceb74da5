use super::{ModelArgs, ModelKind};
use crate::checkpoint::{load_model, StateDict, META_GENERATION};
use crate::config;
use crate::device;
use crate::nets::AutoencoderKL;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// torch.save checkpoint (zip or legacy) or safetensors.
    #[arg(long)]
    input: PathBuf,
    /// Output .safetensors (written atomically).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let dev = device::parse("cpu")?;
    let (loaded_sd, generation, copied, cfg_json, n_in) = match a.m.model {
        ModelKind::Aekl => {
            let cfg = config::aekl_config(&a.m.config)?;
            let sd = StateDict::load(&a.input, a.m.key.as_deref())?;
            let n_in = sd.len();
            let l = load_model(sd, dev, |p, g| AutoencoderKL::new(p, &cfg, g))
                .with_context(|| format!("{} does not fit the config {}", a.input.display(), a.m.config.display()))?;
            (l.state_dict, l.generation, l.report.copied.len(), serde_json::to_string(&cfg)?, n_in)
        }
    };
    for note in &loaded_sd.notes {
        eprintln!("note: {note}");
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("medgen.model".to_string(), format!("{:?}", a.m.model).to_lowercase());
    meta.insert("medgen.config".to_string(), cfg_json);
    meta.insert(META_GENERATION.to_string(), generation.as_str().to_string());
    if let Some(name) = a.input.file_name() {
        meta.insert("medgen.source".to_string(), name.to_string_lossy().into_owned());
    }
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    loaded_sd.save_safetensors(&a.output, &meta)?;
    println!(
        "converted {} ({n_in} tensors, naming {}) -> {} ({copied} tensors, MONAI >= 1.4 names)",
        a.input.display(),
        generation.as_str(),
        a.output.display()
    );
    Ok(())
}
