//! The `medgen` command line.
mod convert;
mod forward;
mod inspect;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "medgen", version, about = "MONAI Generative Models on libtorch")]
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
}

/// Networks the commands know.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// AutoencoderKL (config section `stage1`).
    Aekl,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert(a) => convert::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Inspect(a) => inspect::run(a),
    }
}
