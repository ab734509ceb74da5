//! Prompt contexts: the cross-attention inputs a conditioned UNet takes, computed once from a
//! text encoder and a tokenizer, or read back from a context file (the reference prompt is
//! constant, so a cached file is the fast path for training and sampling).
//!
//! A context file is a safetensors file with
//! * `context` `(prompts, 77, width)`: the prompts, in order;
//! * `uncond_context` `(1, 77, width)`: `""`, the unconditional input the reference samples with;
//! * `null_context` `(1, 77, width)`: the reference training script's classifier-free-guidance
//!   drop, `[BOS] + [EOS] * 76` (not the same as `""` under SD-2.x padding);
//! * the matching `input_ids`, `uncond_input_ids`, `null_input_ids`, and the prompts in the metadata.
use super::clip_text_model::{ClipOutputLayer, ClipTextModel};
use super::tokenizer::ClipTokenizer;
use crate::checkpoint::StateDict;
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub const META_PROMPTS: &str = "medgen.prompts";

/// The three contexts of a prompt set, and where they came from.
#[derive(Debug)]
pub struct PromptContexts {
    pub context: Tensor,
    pub uncond_context: Tensor,
    pub null_context: Tensor,
    pub prompts: Vec<String>,
    /// The token ids behind `context`, `uncond_context` and `null_context` (when known).
    pub input_ids: Option<[Tensor; 3]>,
    /// Provenance (tokenizer, pad token, output layer), kept in the file's metadata.
    pub metadata: BTreeMap<String, String>,
}

impl PromptContexts {
    /// Tokenizes and encodes `prompts`, `""` and the training null sequence.
    pub fn compute(
        encoder: &ClipTextModel,
        tokenizer: &ClipTokenizer,
        prompts: &[String],
        layer: ClipOutputLayer,
    ) -> Result<Self> {
        ensure!(!prompts.is_empty(), "no prompt given");
        let _guard = tch::no_grad_guard();
        let device = encoder.device();
        let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = tokenizer.encode_batch(&texts)?.to_device(device);
        let uncond_ids = tokenizer.encode_batch(&[""])?.to_device(device);
        let null_ids = Tensor::from_slice(&tokenizer.training_null_ids()).unsqueeze(0).to_device(device);
        let encode = |ids: &Tensor| encoder.forward_layer(ids, layer);
        let mut metadata = BTreeMap::new();
        metadata.insert(META_PROMPTS.to_string(), serde_json::to_string(prompts)?);
        metadata.insert("medgen.pad_token".to_string(), tokenizer.pad_token().to_string());
        metadata.insert("medgen.clip_skip".to_string(), layer.skip_last_layers.to_string());
        metadata.insert("medgen.final_layer_norm".to_string(), layer.final_layer_norm.to_string());
        Ok(Self {
            context: encode(&ids)?,
            uncond_context: encode(&uncond_ids)?,
            null_context: encode(&null_ids)?,
            prompts: prompts.to_vec(),
            input_ids: Some([ids, uncond_ids, null_ids]),
            metadata,
        })
    }

    /// Writes a context file (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut sd = StateDict::new();
        sd.insert("context", self.context.to_device(Device::Cpu).to_kind(Kind::Float));
        sd.insert("uncond_context", self.uncond_context.to_device(Device::Cpu).to_kind(Kind::Float));
        sd.insert("null_context", self.null_context.to_device(Device::Cpu).to_kind(Kind::Float));
        if let Some(ids) = &self.input_ids {
            for (k, t) in ["input_ids", "uncond_input_ids", "null_input_ids"].iter().zip(ids) {
                sd.insert(*k, t.to_device(Device::Cpu));
            }
        }
        let mut meta = self.metadata.clone();
        meta.insert(META_PROMPTS.to_string(), serde_json::to_string(&self.prompts)?);
        sd.save_safetensors(path, &meta)
    }

    /// Reads a context file, checking its tensors agree with each other.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let sd = StateDict::load(path, None)?;
        let get = |k: &str| -> Result<Tensor> {
            let t = sd.get(k).with_context(|| format!("{}: no `{k}` tensor (not a context file)", path.display()))?;
            ensure!(t.dim() == 3, "{}: `{k}` must be (n, tokens, width), got {:?}", path.display(), t.size());
            ensure!(
                t.size().iter().all(|&n| n > 0),
                "{}: `{k}` is empty, shape {:?} (it needs at least one prompt, token and channel)",
                path.display(),
                t.size()
            );
            Ok(t.f_to_kind(Kind::Float)?.f_to_device(device)?)
        };
        let (context, uncond_context, null_context) = (get("context")?, get("uncond_context")?, get("null_context")?);
        for (k, t) in [("uncond_context", &uncond_context), ("null_context", &null_context)] {
            ensure!(
                t.size()[1..] == context.size()[1..],
                "{}: `{k}` {:?} does not match `context` {:?}",
                path.display(),
                t.size(),
                context.size()
            );
        }
        let prompts = match sd.metadata.get(META_PROMPTS) {
            Some(p) => serde_json::from_str(p).with_context(|| format!("{}: bad {META_PROMPTS}", path.display()))?,
            None => Vec::new(),
        };
        let ids = |k: &str| sd.get(k).map(|t| t.shallow_clone());
        let input_ids = match (ids("input_ids"), ids("uncond_input_ids"), ids("null_input_ids")) {
            (Some(a), Some(b), Some(c)) => Some([a, b, c]),
            _ => None,
        };
        let metadata = sd.metadata.clone();
        Ok(Self { context, uncond_context, null_context, prompts, input_ids, metadata })
    }

    /// The context width (the UNet's `cross_attention_dim`).
    pub fn width(&self) -> i64 {
        self.context.size()[2]
    }
}
