use crate::device;
use crate::text::clip_text_model::{load_text_encoder, ClipOutputLayer};
use crate::text::context::PromptContexts;
use crate::text::tokenizer::ClipTokenizer;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face `text_encoder` folder: config.json + model.safetensors (or pytorch_model.bin).
    #[arg(long)]
    text_encoder: PathBuf,
    /// tokenizer.json, a Hugging Face tokenizer folder (vocab.json + merges.txt), or the CLIP
    /// `bpe_simple_vocab_16e6.txt.gz`.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Pad token, overriding the tokenizer files: `!` for Stable Diffusion 2.x, `<|endoftext|>` for 1.x.
    /// Required with the .gz vocabulary, which does not say.
    #[arg(long)]
    pad_token: Option<String>,
    /// A prompt; repeat for several (they become the rows of `context`).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Take the hidden state this many layers before the last (diffusers' `clip_skip`).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Do not apply the final layer norm to the chosen hidden state (transformers' raw
    /// `hidden_states[-1 - clip_skip]`).
    #[arg(long)]
    no_final_layer_norm: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Context file (.safetensors, written atomically).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let dev = device::parse(&a.device)?;
    let tokenizer = ClipTokenizer::load(&a.tokenizer, a.pad_token.as_deref())?;
    let encoder = load_text_encoder(&a.text_encoder, dev)?;
    for note in &encoder.notes {
        eprintln!("note: {note}");
    }
    let layer = ClipOutputLayer { skip_last_layers: a.clip_skip, final_layer_norm: !a.no_final_layer_norm };
    let mut ctx = PromptContexts::compute(&encoder.model, &tokenizer, &a.prompt, layer)?;
    ctx.metadata.insert("medgen.tokenizer".to_string(), a.tokenizer.display().to_string());
    ctx.metadata.insert("medgen.text_encoder".to_string(), a.text_encoder.display().to_string());
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    ctx.save(&a.output)?;
    for (p, ids) in a
        .prompt
        .iter()
        .zip(tokenizer.encode_batch(&a.prompt.iter().map(String::as_str).collect::<Vec<_>>())?.split(1, 0))
    {
        let ids: Vec<i64> = Vec::try_from(ids.flatten(0, -1))?;
        let n = ids.iter().position(|&i| i == tokenizer.eos_id()).map_or(ids.len(), |e| e + 1);
        println!("{p:?} -> {:?}", tokenizer.tokens(&ids[..n]));
    }
    println!("wrote context {:?}, uncond_context and null_context to {}", ctx.context.size(), a.output.display());
    Ok(())
}
