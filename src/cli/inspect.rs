use crate::checkpoint::{Generation, StateDict};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint: torch.save (.pt/.pth/.bin, zip or legacy) or .safetensors.
    #[arg(long)]
    input: PathBuf,
    /// Entry of a training checkpoint to read (e.g. `state_dict`, `model.ema`).
    #[arg(long)]
    key: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let sd = StateDict::load(&a.input, a.key.as_deref())?;
    for note in &sd.notes {
        println!("# {note}");
    }
    for (k, v) in &sd.metadata {
        println!("# metadata {k} = {v}");
    }
    let mut params = 0i64;
    for (name, t) in sd.iter() {
        params += t.numel() as i64;
        println!("{name}\t{:?}\t{:?}", t.kind(), t.size());
    }
    println!("# {} tensors, {params} elements, naming: {}", sd.len(), Generation::detect(sd.names()).as_str());
    Ok(())
}
