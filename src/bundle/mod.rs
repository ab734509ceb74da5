//! `medgen convert --bundle DIR`: a MONAI model-zoo bundle of the generative family (`brats_mri_generative_diffusion`,
//! `brats_mri_axial_slices_generative_diffusion`, `brain_image_synthesis_latent_diffusion_model`, in their
//! monai-generative and MONAI-core versions) to medgen configs and safetensors.
//!
//! The bundle's networks are found by their `_target_` (the key names differ between bundles: the brain bundle keeps
//! its UNet under `diffusion_def` and points `network_def` at the autoencoder), each paired with the file its
//! `load_state_dict` / `load_old_state_dict` expression loads, and loaded through medgen's strict loader (old
//! monai-generative keys renamed as for any checkpoint). The sampler settings come from the bundle's scheduler
//! definition, its `set_timesteps(num_inference_steps=N)` call and its noise shape.
pub mod resolve;

use crate::checkpoint::{load_model, StateDict, META_GENERATION};
use crate::nets::{
    AutoencoderKL, AutoencoderKLConfig, ControlNet, ControlNetConfig, DiffusionModelUNet, DiffusionModelUNetConfig,
};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::train::stages::META_SCALE_FACTOR;
use anyhow::{bail, ensure, Context, Result};
use resolve::{call_argument, BundleConfig};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Device;

/// What a `_target_` is to medgen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Autoencoder,
    Diffusion,
    ControlNet,
    Scheduler(SchedulerKind),
}

/// The module paths the generative bundles import their classes from (a bare class name is MONAI's short form).
const PACKAGES: [&str; 4] =
    ["generative.networks.nets", "monai.networks.nets", "generative.networks.schedulers", "monai.networks.schedulers"];

/// The role of a `_target_`, `None` for classes medgen has no use for (savers, samplers, transforms, losses).
/// A class of a network package medgen does not implement is an error.
pub fn classify(target: &str) -> Result<Option<Role>> {
    let class = target.rsplit('.').next().unwrap_or(target);
    let module = target.strip_suffix(class).unwrap_or("").trim_end_matches('.');
    let known_module =
        module.is_empty() || PACKAGES.iter().any(|p| module == *p || module.starts_with(&format!("{p}.")));
    let role = match class {
        "AutoencoderKL" => Some(Role::Autoencoder),
        "DiffusionModelUNet" => Some(Role::Diffusion),
        "ControlNet" => Some(Role::ControlNet),
        "DDPMScheduler" => Some(Role::Scheduler(SchedulerKind::Ddpm)),
        "DDIMScheduler" => Some(Role::Scheduler(SchedulerKind::Ddim)),
        "PNDMScheduler" => Some(Role::Scheduler(SchedulerKind::Pndm)),
        // Trained alongside the autoencoder, never sampled with.
        "PatchDiscriminator" | "MultiScalePatchDiscriminator" => return Ok(None),
        _ => None,
    };
    match role {
        Some(r) if known_module => Ok(Some(r)),
        Some(_) => bail!("`_target_` {target}: medgen reads {class} from {} only", PACKAGES.join(", ")),
        None if module.contains("networks") || module.contains("generation") => bail!(
            "`_target_` {target} is not supported: medgen converts AutoencoderKL, DiffusionModelUNet and ControlNet \
             (monai-generative or MONAI core) and the DDPM, DDIM and PNDM schedulers"
        ),
        None => Ok(None),
    }
}

/// One network of the bundle.
#[derive(Debug)]
struct Network {
    key: String,
    role: Role,
    target: String,
    params: Value,
    weights: PathBuf,
}

/// What `convert_bundle` wrote.
#[derive(Debug)]
pub struct Converted {
    pub files: Vec<PathBuf>,
    pub summary: Value,
}

/// Constructor arguments: the resolved definition without its `_target_`.
fn params_of(def: &Value) -> Value {
    let mut m: Map<String, Value> = def.as_object().cloned().unwrap_or_default();
    m.remove("_target_");
    Value::Object(m)
}

/// `(key, weights path)` for each network key loaded by an expression: `@K.load_state_dict(torch.load(@P))`,
/// `@K.load_old_state_dict(...)`, or `@F(torch.load(@P))` where `F` holds `@K.load...`.
fn weight_loads(cfg: &BundleConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (_, v) in cfg.entries() {
        let exprs: Vec<&str> = match v {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => vec![],
        };
        for e in exprs.into_iter().filter(|e| e.starts_with('$')) {
            let Some(arg) = call_argument(e, "torch.load(") else { continue };
            let path_ref = arg.split(',').next().unwrap_or("").trim();
            let Some(path_id) = path_ref.strip_prefix('@') else { continue };
            let callee = e[1..e.find("(torch.load(").unwrap_or(1).max(1)].trim();
            let target_key = if let Some(k) = callee.strip_prefix('@').and_then(|c| c.split('.').next()) {
                if callee.contains(".load_") {
                    Some(k.to_string())
                } else {
                    // `@load_x_func(...)`: the function key holds `@K.load_old_state_dict if ... else @K.load_state_dict`.
                    cfg.raw(k)
                        .ok()
                        .and_then(|f| f.as_str())
                        .and_then(|f| f.split('@').nth(1).and_then(|r| r.split('.').next()).map(|s| s.to_string()))
                }
            } else {
                None
            };
            if let Some(k) = target_key {
                out.push((k, path_id.to_string()));
            }
        }
    }
    out
}

/// Converts the bundle at `dir` into `out`: `aekl.json`, `ldm.json` (with the sampling section), `controlnet.json`
/// where there is one, their `.safetensors`, and `bundle.json` saying what came from where.
pub fn convert_bundle(dir: &Path, out: &Path) -> Result<Converted> {
    let cfg = BundleConfig::read(dir)?;
    let loads = weight_loads(&cfg);
    let mut networks = Vec::new();
    let mut schedulers = Vec::new();
    let mut ignored = Vec::new();
    for (key, v) in cfg.entries() {
        let Some(target) = v.get("_target_").and_then(|t| t.as_str()) else { continue };
        let role = classify(target).with_context(|| format!("`{key}` in {}", cfg.origin(key)))?;
        match role {
            None => ignored.push(format!("{key} ({target})")),
            Some(Role::Scheduler(kind)) => schedulers.push((key.clone(), kind, target.to_string())),
            Some(role) => {
                let def = cfg.resolved(key)?;
                let Some((_, path_id)) = loads.iter().find(|(k, _)| k == key) else {
                    if cfg.origin(key).contains("train") {
                        ignored.push(format!("{key} ({target}, defined for training, no weights loaded)"));
                        continue;
                    }
                    bail!(
                        "`{key}` ({target}, {}) is never loaded: the bundle has no `@{key}.load_state_dict(torch.load(...))` \
                         (or load_old_state_dict) expression naming its weights",
                        cfg.origin(key)
                    );
                };
                let path = cfg.evaluate_id(path_id)?;
                let path = path.as_str().with_context(|| format!("`{path_id}` is {path}, not a path"))?;
                let path = if Path::new(path).is_absolute() { PathBuf::from(path) } else { dir.join(path) };
                networks.push(Network {
                    key: key.clone(),
                    role,
                    target: target.to_string(),
                    params: params_of(&def),
                    weights: path,
                });
            }
        }
    }
    let one = |role: Role, what: &str| -> Result<Option<&Network>> {
        let found: Vec<&Network> = networks.iter().filter(|n| n.role == role).collect();
        ensure!(
            found.len() <= 1,
            "the bundle loads {} {what}s ({}): medgen converts one of each",
            found.len(),
            found.iter().map(|n| n.key.as_str()).collect::<Vec<_>>().join(", ")
        );
        Ok(found.first().copied())
    };
    let ae = one(Role::Autoencoder, "autoencoder")?.context("the bundle loads no AutoencoderKL")?;
    let unet = one(Role::Diffusion, "diffusion model")?;
    let controlnet = one(Role::ControlNet, "ControlNet")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut files = Vec::new();
    let source = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let meta_base = |model: &str, net: &Network, cfg_json: String, generation: &str| {
        let mut m = BTreeMap::new();
        m.insert("format".to_string(), "pt".to_string());
        m.insert("medgen.model".to_string(), model.to_string());
        m.insert("medgen.config".to_string(), cfg_json);
        m.insert(META_GENERATION.to_string(), generation.to_string());
        m.insert(
            "medgen.source".to_string(),
            format!("{source}/{}", net.weights.strip_prefix(dir).unwrap_or(&net.weights).display()),
        );
        m
    };
    let read_weights = |net: &Network| -> Result<StateDict> {
        StateDict::load(&net.weights, None).with_context(|| format!("the weights of `{}` ({})", net.key, net.target))
    };

    // Autoencoder.
    let ae_cfg: AutoencoderKLConfig = serde_json::from_value(ae.params.clone())
        .with_context(|| format!("`{}` ({}): its parameters", ae.key, ae.target))?;
    ae_cfg.validate().with_context(|| format!("`{}` ({})", ae.key, ae.target))?;
    let loaded = load_model(read_weights(ae)?, Device::Cpu, |p, g| AutoencoderKL::new(p, &ae_cfg, g))
        .with_context(|| format!("{} does not fit `{}`", ae.weights.display(), ae.key))?;
    let ae_json = serde_json::to_value(loaded.model.config())?;
    let f = out.join("autoencoder.safetensors");
    loaded.state_dict.save_safetensors(&f, &meta_base("aekl", ae, ae_json.to_string(), loaded.generation.as_str()))?;
    files.push(f);
    let f = out.join("aekl.json");
    write_json(
        &f,
        &json!({"_comment": format!("Converted from the MONAI bundle {source} (`{}`)", ae.key), "stage1": {"params": ae_json}}),
    )?;
    files.push(f);
    let mut summary = json!({
        "bundle": source,
        "autoencoder": {"key": ae.key, "target": ae.target, "weights": ae.weights.strip_prefix(dir).unwrap_or(&ae.weights), "naming": loaded.generation.as_str()},
    });

    // Diffusion model and its sampler.
    if let Some(unet) = unet {
        let unet_cfg: DiffusionModelUNetConfig = serde_json::from_value(unet.params.clone())
            .with_context(|| format!("`{}` ({}): its parameters", unet.key, unet.target))?;
        unet_cfg.validate().with_context(|| format!("`{}` ({})", unet.key, unet.target))?;
        let loaded = load_model(read_weights(unet)?, Device::Cpu, |p, g| DiffusionModelUNet::new(p, &unet_cfg, g))
            .with_context(|| format!("{} does not fit `{}`", unet.weights.display(), unet.key))?;
        let unet_json = serde_json::to_value(loaded.model.config())?;
        let mut meta = meta_base("unet", unet, unet_json.to_string(), loaded.generation.as_str());
        // The generative bundles decode the sampled latent as it is: their training computes a scale factor but
        // neither stores nor applies it (their READMEs: "should be close to 1.0").
        meta.insert(META_SCALE_FACTOR.to_string(), format!("{:?}", 1.0f64));
        let f = out.join("diffusion_model.safetensors");
        loaded.state_dict.save_safetensors(&f, &meta)?;
        files.push(f);
        let sampling = sampling_section(&cfg, &schedulers)?;
        let f = out.join("ldm.json");
        write_json(
            &f,
            &json!({
                "_comment": format!("Converted from the MONAI bundle {source} (`{}`); `sampling` is the bundle's own sampler", unet.key),
                "ldm": {"params": unet_json, "scheduler": sampling["scheduler"].clone()},
                "sampling": sampling,
            }),
        )?;
        files.push(f);
        summary["diffusion_model"] = json!({"key": unet.key, "target": unet.target, "weights": unet.weights.strip_prefix(dir).unwrap_or(&unet.weights), "naming": loaded.generation.as_str(), "scale_factor": 1.0});
        let latent_c = ae_cfg.latent_channels;
        if unet_cfg.in_channels != latent_c {
            summary["conditioning"] = Value::String(format!(
                "the diffusion model takes {} input channels, the latent has {latent_c}: the bundle's sampler \
                 concatenates {} conditioning channels to the latent (and passes its context); medgen's sampler does not",
                unet_cfg.in_channels,
                unet_cfg.in_channels - latent_c
            ));
        }
    }

    if let Some(cn) = controlnet {
        let cn_cfg: ControlNetConfig = serde_json::from_value(cn.params.clone())
            .with_context(|| format!("`{}` ({}): its parameters", cn.key, cn.target))?;
        cn_cfg.validate().with_context(|| format!("`{}` ({})", cn.key, cn.target))?;
        let loaded = load_model(read_weights(cn)?, Device::Cpu, |p, g| ControlNet::new(p, &cn_cfg, g))
            .with_context(|| format!("{} does not fit `{}`", cn.weights.display(), cn.key))?;
        let cn_json = serde_json::to_value(loaded.model.config())?;
        let f = out.join("controlnet.safetensors");
        loaded
            .state_dict
            .save_safetensors(&f, &meta_base("controlnet", cn, cn_json.to_string(), loaded.generation.as_str()))?;
        files.push(f);
        let f = out.join("controlnet.json");
        write_json(&f, &json!({"controlnet": {"params": cn_json}}))?;
        files.push(f);
        summary["controlnet"] = json!({"key": cn.key, "target": cn.target, "naming": loaded.generation.as_str()});
    }
    summary["not_converted"] = Value::from(ignored);
    let f = out.join("bundle.json");
    write_json(&f, &summary)?;
    files.push(f);
    Ok(Converted { files, summary })
}

/// The bundle's sampler: the scheduler the inference file defines (the training one where it has none), the steps
/// of its `set_timesteps(num_inference_steps=N)` call, and the latent shape of its noise.
fn sampling_section(cfg: &BundleConfig, schedulers: &[(String, SchedulerKind, String)]) -> Result<Value> {
    let pick = schedulers
        .iter()
        .find(|(k, _, _)| cfg.origin(k).ends_with("inference.json"))
        .or_else(|| schedulers.first())
        .context("the bundle defines no DDPM, DDIM or PNDM scheduler")?;
    let (key, kind, target) = pick;
    let params = params_of(&cfg.resolved(key)?);
    let sched: SchedulerConfig =
        serde_json::from_value(params.clone()).with_context(|| format!("`{key}` ({target}): its parameters"))?;
    sched.check_applies_to(*kind).with_context(|| format!("`{key}` ({target})"))?;
    let mut steps = None;
    let mut noise = None;
    for (k, v) in cfg.entries() {
        let Some(e) = v.as_str().filter(|e| e.starts_with('$')) else { continue };
        if e.contains(&format!("@{key}.set_timesteps(")) {
            let arg = call_argument(e, ".set_timesteps(").unwrap_or("");
            let n = arg.trim().trim_start_matches("num_inference_steps=").trim();
            steps = Some(n.parse::<i64>().with_context(|| format!("`{k}`: cannot read the step count of `{e}`"))?);
        }
        if k == "noise" || (noise.is_none() && e.contains("torch.randn(")) {
            if let Some(arg) = call_argument(e, "torch.randn(") {
                let shape = cfg
                    .evaluate(&Value::String(format!("${arg}")))
                    .with_context(|| format!("`{k}`: the noise shape"))?;
                noise = Some(shape);
            }
        }
    }
    let latent_shape: Vec<i64> = match (noise, cfg.contains("latent_shape")) {
        (Some(n), _) => {
            let v: Vec<i64> = serde_json::from_value(n.clone())
                .with_context(|| format!("noise shape {n} is not a list of integers"))?;
            ensure!(v.len() >= 3, "noise shape {v:?}: expected (batch, channels, spatial...)");
            v[1..].to_vec()
        }
        (None, true) => serde_json::from_value(cfg.evaluate_id("latent_shape")?).context("latent_shape")?,
        (None, false) => bail!("the bundle has neither a `torch.randn(...)` noise nor a `latent_shape`"),
    };
    let steps = steps.with_context(|| format!("no `@{key}.set_timesteps(num_inference_steps=N)` in the bundle"))?;
    Ok(json!({
        "scheduler_kind": kind.as_str(),
        "scheduler": serde_json::to_value(&sched)?,
        "num_inference_steps": steps,
        "latent_shape": latent_shape,
    }))
}

/// Writes JSON atomically (temporary file, then rename).
fn write_json(path: &Path, v: &Value) -> Result<()> {
    crate::io::atomic::write_bytes(path, (serde_json::to_string_pretty(v)? + "\n").as_bytes())
}
