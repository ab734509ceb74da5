use super::{ModelArgs, ModelKind};
use crate::checkpoint::StateDict;
use crate::device;
use anyhow::{anyhow, bail, Result};
use clap::ValueEnum;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// AutoencoderKL operations, as MONAI names them. Inputs and outputs are named tensors.
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
    /// Input tensors (.safetensors): `x` for image ops, `z` for decode, `z_mu`/`z_sigma` for
    /// sampling. A file with a single tensor may use any name.
    #[arg(long)]
    inputs: PathBuf,
    /// Output .safetensors.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "reconstruct")]
    op: Op,
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

pub fn run(a: Args) -> Result<()> {
    let dev = device::parse(&a.device)?;
    let inputs = StateDict::load(&a.inputs, None)?;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    match a.m.model {
        ModelKind::Aekl => {
            let l = a.m.load_aekl(&a.weights, dev)?;
            let m = &l.model;
            let _guard = tch::no_grad_guard();
            tch::manual_seed(a.seed);
            match a.op {
                Op::Encode => {
                    let (mu, sigma) = m.encode(&input(&inputs, "x", dev)?)?;
                    out.push(("z_mu".into(), mu));
                    out.push(("z_sigma".into(), sigma));
                }
                Op::Decode | Op::DecodeStage2Outputs => {
                    out.push(("image".into(), m.decode(&input(&inputs, "z", dev)?)?));
                }
                Op::Reconstruct => out.push(("reconstruction".into(), m.reconstruct(&input(&inputs, "x", dev)?)?)),
                Op::Forward => {
                    let (rec, mu, sigma) = m.forward(&input(&inputs, "x", dev)?)?;
                    out.push(("reconstruction".into(), rec));
                    out.push(("z_mu".into(), mu));
                    out.push(("z_sigma".into(), sigma));
                }
                Op::Sampling => {
                    let (mu, sigma) = (input(&inputs, "z_mu", dev)?, input(&inputs, "z_sigma", dev)?);
                    if mu.size() != sigma.size() {
                        bail!("z_mu {:?} and z_sigma {:?} differ in shape", mu.size(), sigma.size());
                    }
                    out.push(("z".into(), m.sampling(&mu, &sigma)));
                }
                Op::EncodeStage2Inputs => out.push(("z".into(), m.encode_stage_2_inputs(&input(&inputs, "x", dev)?)?)),
            }
        }
    }
    let mut sd_out = StateDict::new();
    for (k, v) in out {
        sd_out.insert(k, v);
    }
    let mut meta = BTreeMap::new();
    let op = a.op.to_possible_value().ok_or_else(|| anyhow!("op"))?.get_name().to_string();
    meta.insert("medgen.op".to_string(), op);
    meta.insert("medgen.seed".to_string(), a.seed.to_string());
    sd_out.save_safetensors(&a.output, &meta)?;
    println!("wrote {:?} to {}", sd_out.names(), a.output.display());
    Ok(())
}
