use super::{ModelArgs, ModelKind};
use crate::checkpoint::StateDict;
use crate::device;
use crate::nets::{AutoencoderKL, Conditioning, ControlNet, DiffusionModelUNet};
use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::ValueEnum;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// AutoencoderKL operations, as MONAI names them. Inputs and outputs are named tensors. The UNet
/// and the ControlNet have one operation, `forward`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
pub enum Op {
    /// x -> z_mu, z_sigma
    Encode,
    /// z -> image
    Decode,
    /// x -> reconstruction (decodes z_mu)
    Reconstruct,
    /// x -> reconstruction, z_mu, z_sigma (sampled latent; uses --seed)
    Forward,
    /// z_mu, z_sigma -> z (uses --seed)
    Sampling,
    /// x -> z (sampled latent; uses --seed)
    #[value(name = "encode_stage_2_inputs")]
    EncodeStage2Inputs,
    /// z -> image
    #[value(name = "decode_stage_2_outputs")]
    DecodeStage2Outputs,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// Weights: a medgen .safetensors, or a torch.save checkpoint (converted on the fly).
    #[arg(long)]
    weights: PathBuf,
    /// Input tensors (.safetensors). AutoencoderKL: `x` for image ops, `z` for decode,
    /// `z_mu`/`z_sigma` for sampling (a file with a single tensor may use any name). UNet: `x`,
    /// `timesteps`, optional `context`, `class_labels`, `down_block_additional_residuals.N` and
    /// `mid_block_additional_residual` (a ControlNet's output names are accepted too). ControlNet:
    /// `x`, `timesteps`, `controlnet_cond`, optional `context`, `class_labels`.
    #[arg(long)]
    inputs: PathBuf,
    /// Output .safetensors.
    #[arg(long)]
    output: PathBuf,
    /// AutoencoderKL operation (default `reconstruct`); the UNet and the ControlNet only have `forward`.
    #[arg(long, value_enum)]
    op: Option<Op>,
    /// ControlNet `conditioning_scale`: the factor on every residual it returns.
    #[arg(long, default_value_t = 1.0)]
    conditioning_scale: f64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the torch generator for the stochastic ops.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

fn input(inputs: &StateDict, name: &str, dev: tch::Device) -> Result<Tensor> {
    let t = match inputs.get(name) {
        Some(t) => t.shallow_clone(),
        None if inputs.len() == 1 => inputs.iter().next().unwrap().1.shallow_clone(),
        None => bail!("input tensor {name:?} not found; the file holds {:?}", inputs.names()),
    };
    Ok(t.f_to_kind(Kind::Float)?.f_to_device(dev)?)
}

/// The named inputs of the UNet and the ControlNet, remembering which were read so that a
/// misspelt or stray tensor is an error instead of being ignored.
struct NamedInputs<'a> {
    sd: &'a StateDict,
    dev: tch::Device,
    used: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl<'a> NamedInputs<'a> {
    fn new(sd: &'a StateDict, dev: tch::Device) -> Self {
        Self { sd, dev, used: Default::default() }
    }

    /// Moved to the device as float32, whatever its dtype (as the AutoencoderKL's inputs), except
    /// `timesteps` and `class_labels`, whose integers keep their dtype.
    fn optional(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(t) = self.sd.get(name) else { return Ok(None) };
        self.used.borrow_mut().insert(name.to_string());
        let keeps_integers = matches!(name, "timesteps" | "class_labels");
        let t = if t.is_floating_point() || !keeps_integers { t.f_to_kind(Kind::Float)? } else { t.shallow_clone() };
        Ok(Some(t.f_to_device(self.dev)?))
    }

    fn required(&self, name: &str) -> Result<Tensor> {
        self.optional(name)?
            .ok_or_else(|| anyhow!("input tensor {name:?} not found; the file holds {:?}", self.sd.names()))
    }

    /// `prefix.0`, `prefix.1`, ... in index order (none: an empty list).
    fn indexed(&self, prefix: &str) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        while let Some(t) = self.optional(&format!("{prefix}.{}", out.len()))? {
            out.push(t);
        }
        Ok(out)
    }

    fn check_all_used(&self) -> Result<()> {
        let used = self.used.borrow();
        let unused: Vec<&String> = self.sd.names().iter().filter(|n| !used.contains(*n)).collect();
        if !unused.is_empty() {
            bail!("input tensors {unused:?} are not inputs of this model (it read {:?})", *used);
        }
        Ok(())
    }
}

fn aekl(
    a: &Args,
    m: &AutoencoderKL,
    inputs: &StateDict,
    dev: tch::Device,
    out: &mut Vec<(String, Tensor)>,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(a.seed);
    match a.op.unwrap_or(Op::Reconstruct) {
        Op::Encode => {
            let (mu, sigma) = m.encode(&input(inputs, "x", dev)?)?;
            out.push(("z_mu".into(), mu));
            out.push(("z_sigma".into(), sigma));
        }
        Op::Decode | Op::DecodeStage2Outputs => {
            out.push(("image".into(), m.decode(&input(inputs, "z", dev)?)?));
        }
        Op::Reconstruct => {
            let x = input(inputs, "x", dev)?;
            m.check_reconstructable(&x, "x")?;
            out.push(("reconstruction".into(), m.reconstruct(&x)?));
        }
        Op::Forward => {
            let x = input(inputs, "x", dev)?;
            m.check_reconstructable(&x, "x")?;
            let (rec, mu, sigma) = m.forward(&x)?;
            out.push(("reconstruction".into(), rec));
            out.push(("z_mu".into(), mu));
            out.push(("z_sigma".into(), sigma));
        }
        Op::Sampling => {
            let (mu, sigma) = (input(inputs, "z_mu", dev)?, input(inputs, "z_sigma", dev)?);
            if mu.size() != sigma.size() {
                bail!("z_mu {:?} and z_sigma {:?} differ in shape", mu.size(), sigma.size());
            }
            out.push(("z".into(), m.sampling(&mu, &sigma)));
        }
        Op::EncodeStage2Inputs => out.push(("z".into(), m.encode_stage_2_inputs(&input(inputs, "x", dev)?)?)),
    }
    Ok(())
}

fn unet(m: &DiffusionModelUNet, inputs: &StateDict, dev: tch::Device, out: &mut Vec<(String, Tensor)>) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let inp = NamedInputs::new(inputs, dev);
    let (x, t) = (inp.required("x")?, inp.required("timesteps")?);
    let (context, class_labels) = (inp.optional("context")?, inp.optional("class_labels")?);
    let mut down = inp.indexed("down_block_additional_residuals")?;
    if down.is_empty() {
        down = inp.indexed("down_block_res_samples")?;
    }
    let mid = match inp.optional("mid_block_additional_residual")? {
        Some(m) => Some(m),
        None => inp.optional("mid_block_res_sample")?,
    };
    inp.check_all_used()?;
    let cond = Conditioning {
        context: context.as_ref(),
        class_labels: class_labels.as_ref(),
        down_block_additional_residuals: (!down.is_empty()).then_some(down.as_slice()),
        mid_block_additional_residual: mid.as_ref(),
    };
    out.push(("output".into(), m.forward(&x, &t, &cond)?));
    Ok(())
}

fn controlnet(
    a: &Args,
    m: &ControlNet,
    inputs: &StateDict,
    dev: tch::Device,
    out: &mut Vec<(String, Tensor)>,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let inp = NamedInputs::new(inputs, dev);
    let (x, t, cn_cond) = (inp.required("x")?, inp.required("timesteps")?, inp.required("controlnet_cond")?);
    let (context, class_labels) = (inp.optional("context")?, inp.optional("class_labels")?);
    inp.check_all_used()?;
    let cond = Conditioning { context: context.as_ref(), class_labels: class_labels.as_ref(), ..Default::default() };
    let res = m.forward(&x, &t, &cn_cond, a.conditioning_scale, &cond)?;
    for (i, d) in res.down_block_res_samples.into_iter().enumerate() {
        out.push((format!("down_block_res_samples.{i}"), d));
    }
    out.push(("mid_block_res_sample".into(), res.mid_block_res_sample));
    Ok(())
}

/// The networks check the range of class labels only while the labels are on the CPU (reading device labels back
/// would stop the device at every sampling step): checked here, before the inputs move, so that an out-of-range
/// label never reaches a CUDA embedding lookup (a device-side assert that ends the process).
fn check_class_labels(inputs: &StateDict, num_class_embeds: Option<i64>) -> Result<()> {
    let (Some(l), Some(k)) = (inputs.get("class_labels"), num_class_embeds) else { return Ok(()) };
    if l.numel() == 0 || l.is_floating_point() {
        return Ok(()); // the network refuses these with its own message
    }
    let l = l.f_to_kind(Kind::Int64)?;
    let (lo, hi) = (i64::try_from(l.f_min()?)?, i64::try_from(l.f_max()?)?);
    ensure!(lo >= 0 && hi < k, "class_labels must be in [0, {k}), got values in [{lo}, {hi}]");
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    let dev = device::parse(&a.device)?;
    let inputs = StateDict::load(&a.inputs, None)?;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    if a.m.model != ModelKind::Aekl && a.op.is_some_and(|op| op != Op::Forward) {
        bail!("--op {:?} is an AutoencoderKL operation; the {:?} only has `forward`", a.op.unwrap(), a.m.model);
    }
    // Errors past loading the weights are about the inputs.
    let on_inputs = || format!("--inputs {}", a.inputs.display());
    match a.m.model {
        ModelKind::Aekl => {
            let l = a.m.load_aekl(&a.weights, dev)?;
            aekl(&a, &l.model, &inputs, dev, &mut out).with_context(on_inputs)?
        }
        ModelKind::Unet => {
            let l = a.m.load_unet(&a.weights, dev)?;
            check_class_labels(&inputs, l.model.config().num_class_embeds).with_context(on_inputs)?;
            unet(&l.model, &inputs, dev, &mut out).with_context(on_inputs)?
        }
        ModelKind::Controlnet => {
            let l = a.m.load_controlnet(&a.weights, dev)?;
            check_class_labels(&inputs, l.model.config().num_class_embeds).with_context(on_inputs)?;
            controlnet(&a, &l.model, &inputs, dev, &mut out).with_context(on_inputs)?
        }
    }
    let mut sd_out = StateDict::new();
    for (k, v) in out {
        sd_out.insert(k, v);
    }
    let mut meta = BTreeMap::new();
    let op = a.op.unwrap_or(if a.m.model == ModelKind::Aekl { Op::Reconstruct } else { Op::Forward });
    let op = op.to_possible_value().ok_or_else(|| anyhow!("op"))?.get_name().to_string();
    meta.insert("medgen.op".to_string(), op);
    meta.insert("medgen.seed".to_string(), a.seed.to_string());
    sd_out.save_safetensors(&a.output, &meta)?;
    println!("wrote {:?} to {}", sd_out.names(), a.output.display());
    Ok(())
}
