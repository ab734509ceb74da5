use super::{ModelArgs, ModelKind};
use crate::checkpoint::META_GENERATION;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, value_enum, required_unless_present = "bundle")]
    model: Option<ModelKind>,
    /// JSON config (the reference layout, e.g. configs/aekl_v0.json, or bare parameters).
    #[arg(long, required_unless_present = "bundle")]
    config: Option<PathBuf>,
    /// Entry of a training checkpoint holding the weights (e.g. `state_dict`, `model.ema`).
    #[arg(long)]
    key: Option<String>,
    /// torch.save checkpoint (zip or legacy) or safetensors.
    #[arg(long, required_unless_present = "bundle")]
    input: Option<PathBuf>,
    /// A MONAI model-zoo bundle (a folder with configs/inference.json and models/) to convert as a whole, instead of
    /// --model/--config/--input: its networks by `_target_`, their weights, scheduler and sampling settings
    /// (docs/porting.md#model-zoo-bundles).
    #[arg(long, conflicts_with_all = ["model", "config", "input", "key"])]
    bundle: Option<PathBuf>,
    /// Output .safetensors (written atomically); with --bundle, the folder the configs and weights go to.
    #[arg(long)]
    output: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(dir) = &a.bundle {
        let c = crate::bundle::convert_bundle(dir, &a.output)
            .with_context(|| format!("cannot convert the bundle {}", dir.display()))?;
        for f in &c.files {
            println!("wrote {}", f.display());
        }
        if let Some(note) = c.summary.get("conditioning").and_then(|n| n.as_str()) {
            eprintln!("note: {note}");
        }
        return Ok(());
    }
    let (Some(model), Some(config), Some(input)) = (a.model, a.config.clone(), a.input.clone()) else {
        anyhow::bail!("convert needs --model, --config and --input (or --bundle)")
    };
    let m = ModelArgs { model, config, key: a.key.clone() };
    let a = Single { m, input, output: a.output };
    run_single(a)
}

struct Single {
    m: ModelArgs,
    input: PathBuf,
    output: PathBuf,
}

fn run_single(a: Single) -> Result<()> {
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
