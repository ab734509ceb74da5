//! Reading and writing weights: `torch.save` files (zip and legacy) through a restricted
//! unpickler, safetensors, the strict loader and the old-to-new key renaming.
pub mod loader;
pub mod naming;
pub mod pickle;
pub mod safetensors_file;
pub mod state_dict;
pub mod torch_file;

pub use loader::{load_partial, load_strict, plan_partial, LoadReport};
pub use naming::Generation;
pub use state_dict::StateDict;

use anyhow::Result;
use std::collections::HashMap;
use tch::nn::{self, VarStore};
use tch::Device;

/// Safetensors metadata key under which medgen records a checkpoint's naming generation.
pub const META_GENERATION: &str = "medgen.generation";

/// A model with its weights loaded, and how they were found.
pub struct Loaded<M> {
    pub vs: VarStore,
    pub model: M,
    pub generation: Generation,
    /// The weights under the model's names (old checkpoints renamed).
    pub state_dict: StateDict,
    pub report: LoadReport,
}

/// Shapes of every variable of a store, by name.
pub fn model_shapes(vs: &VarStore) -> HashMap<String, Vec<i64>> {
    vs.variables().into_iter().map(|(k, v)| (k, v.size())).collect()
}

impl Generation {
    /// A checkpoint's generation: recorded in its metadata (converted files), else detected
    /// from its key names.
    pub fn of(sd: &StateDict) -> Self {
        sd.metadata
            .get(META_GENERATION)
            .and_then(|g| Generation::parse(g))
            .unwrap_or_else(|| Generation::detect(sd.names()))
    }
}

/// Builds a model for the checkpoint's generation (recorded in the metadata, else detected
/// from the key names), renames old keys and loads strictly.
pub fn load_model<M>(
    sd: StateDict,
    device: Device,
    build: impl FnOnce(&nn::Path, Generation) -> Result<M>,
) -> Result<Loaded<M>> {
    let generation = Generation::of(&sd);
    let vs = VarStore::new(device);
    let model = build(&vs.root(), generation)?;
    let sd = match generation {
        Generation::Generative => naming::rename_generative(sd, &model_shapes(&vs)),
        Generation::Monai => sd,
    };
    let report = load_strict(&vs, &sd)?;
    Ok(Loaded { vs, model, generation, state_dict: sd, report })
}

/// A tensor from raw little-endian bytes, checking the length (tch does not).
pub fn tensor_from_bytes(bytes: &[u8], shape: &[i64], kind: tch::Kind) -> Result<tch::Tensor> {
    let need = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
        .and_then(|n| n.checked_mul(kind.elt_size_in_bytes()))
        .ok_or_else(|| anyhow::anyhow!("invalid shape {shape:?} for a {kind:?} tensor"))?;
    anyhow::ensure!(
        bytes.len() == need,
        "{} bytes for a {kind:?} tensor of shape {shape:?} ({need} bytes)",
        bytes.len()
    );
    Ok(tch::Tensor::f_from_data_size(bytes, shape, kind)?)
}
