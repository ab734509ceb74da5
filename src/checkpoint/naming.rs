//! The two generations of MONAI generative key names.
//!
//! medgen's models use MONAI >= 1.4 names. Checkpoints from monai-generative 0.2.x
//! (`generative.networks.nets`) are renamed by rule on load, guided by the model's own key
//! set so that no rule can fire where it does not belong:
//!
//! * attention `B.to_q|to_k|to_v.*`  ->  `B.attn.to_q|to_k|to_v.*`
//! * transformer attention output `B.attn1|attn2.to_out.0.*`  ->  `B.attn1|attn2.out_proj.*`
//! * nearest-upsample conv `B.conv.conv.*`  ->  `B.postconv.conv.*`
//! * `B.proj_attn.*` is dropped. monai-generative creates it but never applies it (since its
//!   commit "Optimise Attention Mechanisms", Jan 2023), so an old checkpoint's outputs never
//!   depended on it. MONAI 1.6's `load_old_state_dict` copies it into `attn.out_proj`, which
//!   changes the outputs; medgen instead sets `attn.out_proj` to the identity (weight `I`,
//!   bias 0) when the model has one, which reproduces the old outputs exactly.
use super::state_dict::StateDict;
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Which library's layout a checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// MONAI core >= 1.4 (`monai.networks.nets`).
    Monai,
    /// monai-generative 0.2.x (`generative.networks.nets`).
    Generative,
}

impl Generation {
    pub fn as_str(self) -> &'static str {
        match self {
            Generation::Monai => "monai",
            Generation::Generative => "generative-0.2",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "monai" => Some(Generation::Monai),
            "generative-0.2" | "generative" => Some(Generation::Generative),
            _ => None,
        }
    }

    /// Guesses from key names: old spatial attention blocks hold `proj_attn` and their `to_q`
    /// is not under `attn`; old transformer attention has `to_out.0`; old upsample convs are
    /// `conv.conv` (AE decoder, UNet `upsampler`).
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a String>) -> Self {
        for n in names {
            if n.contains(".proj_attn.") {
                return Generation::Generative;
            }
            let parts: Vec<&str> = n.split('.').collect();
            if parts.len() >= 3 {
                let leaf = parts[parts.len() - 2];
                // Transformer attention is `attn1|attn2.to_q` in both generations.
                let parent = parts[parts.len() - 3];
                if matches!(leaf, "to_q" | "to_k" | "to_v") && !matches!(parent, "attn" | "attn1" | "attn2") {
                    return Generation::Generative;
                }
            }
            if n.contains(".to_out.0.") {
                return Generation::Generative;
            }
            if (n.starts_with("decoder.blocks.") || n.contains(".upsampler.")) && n.contains(".conv.conv.") {
                return Generation::Generative;
            }
        }
        Generation::Monai
    }
}

/// Renames an old-generation state dict to the model's names. `model` maps every model
/// variable name to its shape. Entries no rule applies to are left alone, for the strict
/// loader to report.
pub fn rename_generative(sd: StateDict, model: &HashMap<String, Vec<i64>>) -> StateDict {
    let mut out = StateDict::new();
    out.metadata = sd.metadata.clone();
    out.notes = sd.notes.clone();
    let mut dropped = 0;
    let mut attn_blocks: Vec<String> = Vec::new();
    let mut renamed = 0;
    for (name, t) in sd.iter() {
        if model.contains_key(name) {
            out.insert(name.clone(), t.shallow_clone());
            continue;
        }
        if name.contains(".proj_attn.") && (name.ends_with(".weight") || name.ends_with(".bias")) {
            dropped += 1;
            continue;
        }
        let mut new_name = None;
        for leaf in ["to_q", "to_k", "to_v"] {
            if let Some(pos) = name.rfind(&format!(".{leaf}.")) {
                let cand = format!("{}.attn{}", &name[..pos], &name[pos..]);
                if model.contains_key(&cand) {
                    let block = name[..pos].to_string();
                    if !attn_blocks.contains(&block) {
                        attn_blocks.push(block);
                    }
                    new_name = Some(cand);
                }
            }
        }
        if new_name.is_none() && name.contains(".to_out.0.") {
            let cand = name.replacen(".to_out.0.", ".out_proj.", 1);
            if model.contains_key(&cand) {
                new_name = Some(cand);
            }
        }
        if new_name.is_none() && name.contains(".conv.conv.") {
            let cand = name.replacen(".conv.conv.", ".postconv.conv.", 1);
            if model.contains_key(&cand) {
                new_name = Some(cand);
            }
        }
        match new_name {
            Some(n) => {
                renamed += 1;
                out.insert(n, t.shallow_clone());
            }
            None => out.insert(name.clone(), t.shallow_clone()),
        }
    }
    let mut synthesized = 0;
    for block in &attn_blocks {
        let w = format!("{block}.attn.out_proj.weight");
        let b = format!("{block}.attn.out_proj.bias");
        if let (Some(ws), false) = (model.get(&w), out.contains(&w)) {
            out.insert(w.clone(), Tensor::eye(ws[0], (Kind::Float, tch::Device::Cpu)));
            synthesized += 1;
        }
        if let (Some(bs), false) = (model.get(&b), out.contains(&b)) {
            out.insert(b.clone(), Tensor::zeros(bs.as_slice(), (Kind::Float, tch::Device::Cpu)));
        }
    }
    out.notes.push(format!(
        "monai-generative 0.2 checkpoint: renamed {renamed} keys to MONAI >= 1.4 names, dropped {dropped} \
         `proj_attn` tensors (never applied by that library){}",
        if synthesized > 0 {
            format!(", set {synthesized} `attn.out_proj` layers to the identity")
        } else {
            String::new()
        }
    ));
    out
}
