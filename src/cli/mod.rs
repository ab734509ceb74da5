//! The `medgen` command line.
mod bench;
mod convert;
mod encode_prompt;
mod eval;
mod forward;
mod gpu_check;
mod inspect;
mod launch;
mod preprocess;
mod sample;
mod synth;
mod train;

use crate::checkpoint::{load_model, Loaded, StateDict};
use crate::config;
use crate::nets::{AutoencoderKL, ControlNet, DiffusionModelUNet};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "medgen",
    version,
    about = "MONAI Generative Models on libtorch",
    after_help = "Exit status: 0 on success; 1 on an error (a bad input, file or option: the one `error:` \
                  line says what); 2 on a command line that does not parse; 70 on an internal error (a bug: \
                  the `internal error at file:line` line asks for a report, and RUST_BACKTRACE=1 adds the \
                  backtrace)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Port a PyTorch/MONAI checkpoint to safetensors, checked strictly against a config.
    Convert(convert::Args),
    /// Run a network on named input tensors (safetensors) and write its outputs.
    Forward(forward::Args),
    /// List the tensors of a checkpoint (torch.save or safetensors).
    Inspect(inspect::Args),
    /// Encode prompts with a CLIP text encoder into a context file for training and sampling.
    EncodePrompt(encode_prompt::Args),
    /// Extract the reference 2D slices (PNG) and train/validation/test lists from T1w/FLAIR volumes.
    Preprocess(preprocess::Args),
    /// Write the synthetic default data set (T1w/FLAIR volumes) built from real anatomy.
    Synth(synth::Args),
    /// Train a stage: the AutoencoderKL, the LDM or the ControlNet.
    Train(train::Args),
    /// Run a medgen command as one data-parallel job of N local processes (as torchrun does).
    Launch(launch::Args),
    /// Sample T1w slices from the LDM, or translate FLAIR slices to T1w with the ControlNet.
    Sample(sample::Args),
    /// Time one operation as bench/reference.py times the Python reference (for `make bench`).
    Bench(bench::Args),
    /// The reference metrics (reconstruction MS-SSIM, FID/KID, diversity, FLAIR->T1w PSNR/MAE/MS-SSIM) and the report.
    Eval(eval::Args),
    /// The CUDA paths against the CPU (forwards, mixed-precision training, sampling, FID features): gpu-check/report.md.
    GpuCheck(gpu_check::Args),
}

/// Networks the commands know.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// AutoencoderKL (config section `stage1`).
    Aekl,
    /// DiffusionModelUNet (config section `ldm`).
    Unet,
    /// ControlNet (config section `controlnet`).
    Controlnet,
}

/// Which network, its config, and where its weights sit inside a checkpoint.
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    #[arg(long, value_enum)]
    pub model: ModelKind,
    /// JSON config (the reference layout, e.g. configs/aekl_v0.json, or bare parameters).
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// Entry of a training checkpoint holding the weights (e.g. `state_dict`, `model.ema`).
    #[arg(long)]
    pub key: Option<String>,
}

impl ModelArgs {
    /// Reads the weights and loads them strictly into the model `build` makes; errors name
    /// the weights file and the config.
    fn load<M>(
        &self,
        weights: &std::path::Path,
        device: tch::Device,
        build: impl FnOnce(&tch::nn::Path, crate::checkpoint::Generation) -> Result<M>,
    ) -> Result<Loaded<M>> {
        let sd = StateDict::load(weights, self.key.as_deref())?;
        load_model(sd, device, build)
            .with_context(|| format!("{} does not fit the config {}", weights.display(), self.config.display()))
    }

    /// The config is read first, so a bad config is reported before a large checkpoint is read.
    fn load_aekl(&self, weights: &std::path::Path, device: tch::Device) -> Result<Loaded<AutoencoderKL>> {
        let cfg = config::aekl_config(&self.config)?;
        self.load(weights, device, |p, g| AutoencoderKL::new(p, &cfg, g))
    }

    fn load_unet(&self, weights: &std::path::Path, device: tch::Device) -> Result<Loaded<DiffusionModelUNet>> {
        let cfg = config::unet_config(&self.config)?;
        self.load(weights, device, |p, g| DiffusionModelUNet::new(p, &cfg, g))
    }

    fn load_controlnet(&self, weights: &std::path::Path, device: tch::Device) -> Result<Loaded<ControlNet>> {
        let cfg = config::controlnet_config(&self.config)?;
        self.load(weights, device, |p, g| ControlNet::new(p, &cfg, g))
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::EncodePrompt(a) => encode_prompt::run(a),
        Command::Preprocess(a) => preprocess::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Train(a) => train::run(a),
        Command::Launch(a) => launch::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::GpuCheck(a) => gpu_check::run(a),
    }
}

/// A progress bar on stderr: `prefix [bar] pos/len unit [elapsed<eta] message`.
fn progress_bar(len: u64, prefix: &str, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let template = format!("{{prefix}} {{wide_bar}} {{pos}}/{{len}} {unit} [{{elapsed}}<{{eta}}] {{msg}}");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.set_prefix(prefix.to_string());
    bar
}
