use super::{ModelArgs, ModelKind};
use crate::checkpoint::META_GENERATION;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::Device;

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
    let (loaded_sd, generation, cfg_json) = match a.m.model {
        ModelKind::Aekl => {
            let l = a.m.load_aekl(&a.input, Device::Cpu)?;
            (l.state_dict, l.generation, serde_json::to_string(l.model.config())?)
        }
        ModelKind::Unet => {
            let l = a.m.load_unet(&a.input, Device::Cpu)?;
            (l.state_dict, l.generation, serde_json::to_string(l.model.config())?)
        }
        ModelKind::Controlnet => {
            let l = a.m.load_controlnet(&a.input, Device::Cpu)?;
            (l.state_dict, l.generation, serde_json::to_string(l.model.config())?)
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
        "converted {} (naming {}) -> {} ({} tensors, MONAI >= 1.4 names)",
        a.input.display(),
        generation.as_str(),
        a.output.display(),
        loaded_sd.len()
    );
    Ok(())
}
