use crate::amp::Precision;
use crate::device;
use crate::train::stages::{train_aekl, train_controlnet, train_ldm, TrainInputs};
use anyhow::{ensure, Result};
use clap::ValueEnum;
use std::path::PathBuf;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// AutoencoderKL with its patch discriminator and perceptual loss.
    Aekl,
    /// The latent diffusion UNet on the frozen autoencoder's latents.
    Ldm,
    /// The ControlNet on FLAIR, initialised from the frozen LDM UNet.
    Controlnet,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_enum)]
    stage: Stage,
    /// Stage config (the reference layout plus a `train` section), e.g. configs/demo/aekl.json.
    #[arg(long)]
    config: PathBuf,
    /// Directory with train.tsv and validation.tsv (`medgen preprocess` output).
    #[arg(long)]
    data: PathBuf,
    /// Run directory: checkpoint, best/final weights, metrics.jsonl, loss_curve.png, image grids.
    #[arg(long)]
    run: PathBuf,
    /// Continue the run in --run from its checkpoint, exactly.
    #[arg(long)]
    resume: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// LDM/ControlNet: the AutoencoderKL config and weights (e.g. runs/aekl/final_model.safetensors).
    #[arg(long, requires = "stage1_weights")]
    stage1_config: Option<PathBuf>,
    #[arg(long, requires = "stage1_config")]
    stage1_weights: Option<PathBuf>,
    /// ControlNet: the LDM config and UNet weights.
    #[arg(long, requires = "ldm_weights")]
    ldm_config: Option<PathBuf>,
    #[arg(long, requires = "ldm_config")]
    ldm_weights: Option<PathBuf>,
    /// A context file from `medgen encode-prompt`, for a conditioned UNet.
    #[arg(long)]
    context: Option<PathBuf>,
    /// The Python environment `make setup` made (LPIPS lin heads are read from its lpips package).
    #[arg(long, default_value = ".venv")]
    venv: PathBuf,
    /// Precision of the forward passes: fp32, fp16 (autocast + dynamic loss scaling, the
    /// reference's GPU setting) or bf16 (autocast). Default: fp16 on CUDA, fp32 on the CPU.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Stop after this many optimiser steps, with a checkpoint (as an interruption would).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Data-parallel jobs (launched by `medgen launch`, torchrun, mpirun or srun): seconds to wait
    /// for the other processes at the rendezvous and in any collective before failing.
    #[arg(long, default_value_t = 300.0)]
    dist_timeout: f64,
    /// Reproducible CUDA runs: deterministic cuDNN, no cuDNN benchmarking, no TF32 (see docs/training.md).
    #[arg(long)]
    deterministic: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.deterministic {
        device::set_deterministic()?;
    }
    let mut device = device::parse(&a.device)?;
    let mut job = None;
    if let Some(env) = crate::distributed::DistEnv::from_env()? {
        // One GPU per process: cuda:LOCAL_RANK, or the one GPU a Slurm task is bound to.
        device = crate::distributed::rank_device(device, env.local_rank, tch::Cuda::device_count().max(0) as usize)?;
        ensure!(a.dist_timeout > 0.0, "--dist-timeout must be positive");
        job = crate::distributed::init_from_env(device, std::time::Duration::from_secs_f64(a.dist_timeout))?;
    }
    let precision = a.precision.unwrap_or(if device.is_cuda() { Precision::Fp16 } else { Precision::Fp32 });
    let inputs = TrainInputs {
        config: a.config,
        data: a.data,
        run: a.run,
        resume: a.resume,
        device,
        precision,
        stage1: a.stage1_config.zip(a.stage1_weights),
        ldm: a.ldm_config.zip(a.ldm_weights),
        context: a.context,
        venv: a.venv,
        max_steps: a.max_steps,
    };
    let trained = match a.stage {
        Stage::Aekl => train_aekl(&inputs),
        Stage::Ldm => train_ldm(&inputs),
        Stage::Controlnet => train_controlnet(&inputs),
    };
    // A failed job's group is aborted as `job` drops (its peers may be gone).
    match job {
        Some(job) if trained.is_ok() => job.leave(),
        _ => trained,
    }
}
