//! The CLIP text encoder Stable Diffusion conditions on: Hugging Face transformers' `CLIPTextModel`
//! (token + learned position embeddings, pre-LN transformer layers with a causal mask, final LayerNorm),
//! and the loader of a Hugging Face `text_encoder` folder (`config.json` plus the weights).
//!
//! Variables are named as the state dict of transformers 4.x, which every Stable Diffusion repository ships
//! (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.N.self_attn.q_proj.weight`, ...);
//! the other layouts are renamed on load (see [`normalize_text_encoder_keys`]).
use crate::checkpoint::{load_strict, StateDict};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// Prefix of every text-tower key in transformers 4.x files and in full `CLIPModel` files.
pub const TEXT_MODEL_PREFIX: &str = "text_model.";
/// The position-ids buffer transformers 4.x saved (persistent until 4.31); not a weight.
pub const POSITION_IDS_KEY: &str = "text_model.embeddings.position_ids";

/// `hidden_act` values of the CLIP text configs in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// Exact (erf) GELU: SD-2.x (OpenCLIP ViT-H/14).
    Gelu,
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP, SD-1.x.
    QuickGelu,
    /// Tanh approximation written out in elementwise ops (transformers' `NewGELUActivation`).
    GeluNew,
    /// Tanh approximation as torch's fused `gelu(approximate="tanh")`.
    GeluPytorchTanh,
}

impl ClipActivation {
    const NAMES: &'static [&'static str] = &["gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh"];

    /// Each variant as its library computes it, op for op, so the result is the same float.
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            ClipActivation::Gelu => x.gelu("none"),
            ClipActivation::QuickGelu => x * (x * 1.702).sigmoid(),
            ClipActivation::GeluNew => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let inner = (x + x.pow_tensor_scalar(3.0) * 0.044715) * c;
                (x * 0.5) * (inner.tanh() + 1.0)
            }
            ClipActivation::GeluPytorchTanh => x.gelu("tanh"),
        }
    }
}

/// The text-model fields of a Hugging Face `CLIPTextConfig`, with its defaults (those of
/// `openai/clip-vit-base-patch32`). Other keys of `config.json` (`architectures`, `dtype`, `projection_dim`,
/// token ids, dropout, init ranges) do not change the forward pass and are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

const TEXT_MODEL_TYPE: &str = "clip_text_model";
const FULL_MODEL_TYPE: &str = "clip";
const FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
];

impl ClipTextConfig {
    /// Reads a `config.json` of a `CLIPTextModel` (or `CLIPTextModelWithProjection`), or of a full `CLIPModel`,
    /// whose `text_config` is used.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(Self::from_file_noted(path)?.0)
    }

    /// [`Self::from_file`], with a note when the text config was taken from a full CLIP config.
    pub fn from_file_noted(path: &Path) -> Result<(Self, Option<String>)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the CLIP text encoder config {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_value(&v, &path.display().to_string())
    }

    /// Parses a Hugging Face config held in `v`; `origin` (a file name) heads every error.
    pub fn from_value(v: &Value, origin: &str) -> Result<(Self, Option<String>)> {
        let obj = v.as_object().ok_or_else(|| anyhow!("{origin}: the config is not a JSON object"))?;
        let model_type = match obj.get("model_type") {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => bail!("{origin}: model_type must be a string, got {other}"),
        };
        let nested = obj.get("text_config");
        let (section, note) = match (model_type, nested) {
            (Some(FULL_MODEL_TYPE), _) | (None, Some(_)) => {
                // Older configs (openai/clip-vit-*) also carry `text_config_dict`. transformers then builds the text
                // config from it alone, unset keys at their defaults, replacing `text_config`: so does medgen.
                let (key, section) = match obj.get("text_config_dict") {
                    Some(d @ Value::Object(_)) => ("text_config_dict", Some(d)),
                    _ => ("text_config", nested),
                };
                let t = match section {
                    Some(Value::Object(t)) => t.clone(),
                    Some(Value::Null) | None => serde_json::Map::new(),
                    Some(other) => bail!("{origin}: {key} must be an object, got {other}"),
                };
                if let Some(Value::String(inner)) = t.get("model_type") {
                    ensure!(
                        inner == TEXT_MODEL_TYPE,
                        "{origin}: {key}.model_type is {inner:?}, expected {TEXT_MODEL_TYPE:?}"
                    );
                }
                (Value::Object(t), Some((key, format!("{origin} is a full CLIP config: used its {key}"))))
            }
            (Some(TEXT_MODEL_TYPE), _) | (None, None) => (v.clone(), None),
            (Some(other), _) => bail!(
                "{origin}: model_type {other:?} is not a CLIP text encoder (expected {TEXT_MODEL_TYPE:?}, or \
                 {FULL_MODEL_TYPE:?} with a text_config)"
            ),
        };
        let (origin_section, note) = match note {
            Some((key, note)) => (format!("{origin} ({key})"), Some(note)),
            None => (origin.to_string(), None),
        };
        let obj = section.as_object().expect("an object");
        if let Some(act) = obj.get("hidden_act") {
            match act.as_str() {
                Some(a) if ClipActivation::NAMES.contains(&a) => {}
                _ => bail!(
                    "{origin_section}: hidden_act {act} is not supported (known: {})",
                    ClipActivation::NAMES.join(", ")
                ),
            }
        }
        // Only the fields medgen reads: the rest of a HF config may hold anything.
        let mut picked = serde_json::Map::new();
        for k in FIELDS.iter().chain(&["hidden_act", "layer_norm_eps"]) {
            match obj.get(*k) {
                None | Some(Value::Null) => {}
                Some(x) => {
                    picked.insert(k.to_string(), x.clone());
                }
            }
        }
        let cfg: ClipTextConfig = serde_json::from_value(Value::Object(picked))
            .with_context(|| format!("{origin_section}: not a CLIP text config"))?;
        cfg.validate().with_context(|| format!("invalid CLIP text config {origin_section}"))?;
        Ok((cfg, note))
    }

    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in sizes {
            ensure!(v > 0, "{name} must be positive, got {v}");
        }
        ensure!(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size ({}) must be divisible by num_attention_heads ({})",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0,
            "layer_norm_eps must be a non-negative number, got {}",
            self.layer_norm_eps
        );
        Ok(())
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// Which hidden state [`ClipTextModel::forward_layer`] returns.
///
/// | `skip_last_layers`, `final_layer_norm` | equals |
/// |---|---|
/// | `0, true` (the default) | HF `last_hidden_state` |
/// | `1, false` | HF `output_hidden_states=True` -> `hidden_states[-2]` |
/// | `n, true` | diffusers' `clip_skip=n`: `final_layer_norm(hidden_states[-(n+1)])` |
/// | `n, false` | HF `hidden_states[-(n+1)]` |
///
/// `skip_last_layers` may be at most `num_hidden_layers` (which selects the embeddings' output,
/// `hidden_states[0]`). The skipped layers are not computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipOutputLayer {
    pub skip_last_layers: usize,
    pub final_layer_norm: bool,
}

impl ClipOutputLayer {
    /// HF `last_hidden_state`.
    pub const LAST_HIDDEN_STATE: Self = Self { skip_last_layers: 0, final_layer_norm: true };
    /// HF `hidden_states[-2]`, without the final LayerNorm.
    pub const PENULTIMATE: Self = Self { skip_last_layers: 1, final_layer_norm: false };

    /// diffusers' `clip_skip`: the output `n` layers before the last, through the final LayerNorm.
    pub fn clip_skip(n: usize) -> Self {
        Self { skip_last_layers: n, final_layer_norm: true }
    }
}

impl Default for ClipOutputLayer {
    fn default() -> Self {
        Self::LAST_HIDDEN_STATE
    }
}

/// How attention is computed; both agree with either HF path to float32 rounding (~1e-6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClipAttention {
    /// HF's eager path, op for op: `matmul(q, kᵀ) * scale`, causal mask, float32 softmax, `matmul(p, v)`.
    /// Bit-identical to transformers' `attn_implementation="eager"` on one CPU thread, hence the default.
    #[default]
    Eager,
    /// `scaled_dot_product_attention(is_causal=true)`: HF's `sdpa` path, and libtorch's fused kernels on GPU.
    Sdpa,
}

#[derive(Debug)]
struct SelfAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
    head_dim: i64,
    scale: f64,
}

impl SelfAttention {
    fn new(p: &nn::Path, cfg: &ClipTextConfig) -> Self {
        let c = cfg.hidden_size;
        let lin = |name: &str| nn::linear(p / name, c, c, Default::default());
        let head_dim = cfg.head_dim();
        Self {
            q_proj: lin("q_proj"),
            k_proj: lin("k_proj"),
            v_proj: lin("v_proj"),
            out_proj: lin("out_proj"),
            heads: cfg.num_attention_heads,
            head_dim,
            // `head_dim ** -0.5`, as HF writes it, so the scale is the same float.
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// `causal_mask` is true above the diagonal (the future positions a token may not see).
    fn forward(&self, x: &Tensor, causal_mask: &Tensor, how: ClipAttention) -> Tensor {
        let (b, n, c) = x.size3().expect("hidden states are (batch, tokens, channels)");
        let split = |t: Tensor| t.view([b, n, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(x.apply(&self.q_proj));
        let k = split(x.apply(&self.k_proj));
        let v = split(x.apply(&self.v_proj));
        let out = match how {
            ClipAttention::Eager => {
                // HF adds a mask holding the dtype's lowest value; -inf gives the same softmax (the masked
                // exponentials are exactly 0 either way, and the diagonal is never masked).
                let scores = (q.matmul(&k.transpose(-1, -2)) * self.scale).masked_fill(causal_mask, f64::NEG_INFINITY);
                scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
            }
            ClipAttention::Sdpa => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, self.scale, false)
            }
        };
        out.transpose(1, 2).contiguous().reshape([b, n, c]).apply(&self.out_proj)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    layer_norm2: nn::LayerNorm,
    act: ClipActivation,
}

fn layer_norm(p: nn::Path, cfg: &ClipTextConfig) -> nn::LayerNorm {
    nn::layer_norm(p, vec![cfg.hidden_size], nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() })
}

impl EncoderLayer {
    fn new(p: &nn::Path, cfg: &ClipTextConfig) -> Self {
        let mlp = p / "mlp";
        Self {
            self_attn: SelfAttention::new(&(p / "self_attn"), cfg),
            layer_norm1: layer_norm(p / "layer_norm1", cfg),
            fc1: nn::linear(&mlp / "fc1", cfg.hidden_size, cfg.intermediate_size, Default::default()),
            fc2: nn::linear(&mlp / "fc2", cfg.intermediate_size, cfg.hidden_size, Default::default()),
            layer_norm2: layer_norm(p / "layer_norm2", cfg),
            act: cfg.hidden_act,
        }
    }

    /// Pre-LN: `x + attn(ln1(x))`, then `h + mlp(ln2(h))`.
    fn forward(&self, x: &Tensor, causal_mask: &Tensor, how: ClipAttention) -> Tensor {
        let h = x + self.self_attn.forward(&x.apply(&self.layer_norm1), causal_mask, how);
        let m = self.act.apply(&h.apply(&self.layer_norm2).apply(&self.fc1)).apply(&self.fc2);
        h + m
    }
}

/// Hugging Face `CLIPTextModel` (inference).
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    cfg: ClipTextConfig,
    attention: ClipAttention,
}

impl ClipTextModel {
    /// Creates the variables under `p / "text_model"`, named as the transformers 4.x state dict.
    pub fn new(p: &nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate().context("invalid CLIP text config")?;
        let t = p / "text_model";
        let emb = &t / "embeddings";
        let c = cfg.hidden_size;
        let token_embedding = nn::embedding(&emb / "token_embedding", cfg.vocab_size, c, Default::default());
        let position_embedding =
            nn::embedding(&emb / "position_embedding", cfg.max_position_embeddings, c, Default::default());
        let layers_p = &t / "encoder" / "layers";
        let layers = (0..cfg.num_hidden_layers).map(|i| EncoderLayer::new(&(&layers_p / i), cfg)).collect();
        let final_layer_norm = layer_norm(&t / "final_layer_norm", cfg);
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            cfg: cfg.clone(),
            attention: ClipAttention::default(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// Where the weights are; inputs are moved there.
    pub fn device(&self) -> Device {
        self.token_embedding.ws.device()
    }

    pub fn attention(&self) -> ClipAttention {
        self.attention
    }

    pub fn set_attention(&mut self, how: ClipAttention) {
        self.attention = how;
    }

    /// HF `last_hidden_state`: `(batch, seq)` token ids to `(batch, seq, hidden_size)`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_layer(input_ids, ClipOutputLayer::LAST_HIDDEN_STATE)
    }

    /// The hidden state `out` selects (see [`ClipOutputLayer`]).
    pub fn forward_layer(&self, input_ids: &Tensor, out: ClipOutputLayer) -> Result<Tensor> {
        let n_layers = self.layers.len();
        ensure!(
            out.skip_last_layers <= n_layers,
            "cannot skip {} layers of a CLIP text encoder with {n_layers}",
            out.skip_last_layers
        );
        let (mut h, mask) = self.embed(input_ids)?;
        for layer in &self.layers[..n_layers - out.skip_last_layers] {
            h = layer.forward(&h, &mask, self.attention);
        }
        Ok(if out.final_layer_norm { h.apply(&self.final_layer_norm) } else { h })
    }

    /// HF `output_hidden_states=True`: the embeddings' output and every layer's output (`num_hidden_layers + 1`
    /// tensors, none through the final LayerNorm).
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Vec<Tensor>> {
        let (mut h, mask) = self.embed(input_ids)?;
        let mut all = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            let next = layer.forward(&h, &mask, self.attention);
            all.push(std::mem::replace(&mut h, next));
        }
        all.push(h);
        Ok(all)
    }

    /// The final LayerNorm alone (to apply to a state from [`Self::hidden_states`]).
    pub fn final_layer_norm(&self, h: &Tensor) -> Tensor {
        h.apply(&self.final_layer_norm)
    }

    /// Checks the ids, then token + position embeddings and the causal mask for their length.
    fn embed(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let ids = self.check_ids(input_ids)?;
        let device = self.device();
        let ids = ids.to_device(device);
        let n = ids.size()[1];
        let positions = self.position_embedding.ws.narrow(0, 0, n);
        let h = ids.apply(&self.token_embedding) + positions;
        let mask = Tensor::ones([n, n], (Kind::Bool, device)).triu(1);
        Ok((h, mask))
    }

    fn check_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let size = ids.size();
        ensure!(size.len() == 2, "CLIP text encoder input_ids must be (batch, sequence), got shape {size:?}");
        ensure!(
            matches!(ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8),
            "CLIP text encoder input_ids must be integer token ids, got {:?}",
            ids.kind()
        );
        let (seq, max) = (size[1], self.cfg.max_position_embeddings);
        ensure!(seq > 0, "CLIP text encoder input_ids hold an empty sequence (shape {size:?})");
        ensure!(
            seq <= max,
            "sequence length {seq} exceeds the CLIP text encoder's max_position_embeddings ({max}); shape {size:?}"
        );
        let ids = ids.to_kind(Kind::Int64);
        if ids.numel() > 0 {
            let vocab = self.cfg.vocab_size;
            let bad = ids.lt(0).logical_or(&ids.ge(vocab)).nonzero();
            if bad.size()[0] > 0 {
                let (b, s) = (bad.int64_value(&[0, 0]), bad.int64_value(&[0, 1]));
                bail!(
                    "token id {} at input_ids[{b}, {s}] is out of range for vocab_size {vocab} ({} ids out of range)",
                    ids.int64_value(&[b, s]),
                    bad.size()[0]
                );
            }
        }
        Ok(ids)
    }
}

/// A CLIP text encoder with its weights loaded from a Hugging Face `text_encoder` folder.
pub struct LoadedTextEncoder {
    pub vs: VarStore,
    pub model: ClipTextModel,
    pub config: ClipTextConfig,
    /// The weight file(s) read.
    pub weights: Vec<PathBuf>,
    /// What was decided on the way: which file, the config section, renamed and dropped keys, dtype conversion.
    pub notes: Vec<String>,
}

/// Weight files of a `text_encoder` folder, in order of preference: safetensors over pickles, the full-precision
/// file over diffusers' `fp16` variant.
const WEIGHT_FILES: &[&str] = &[
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.fp16.safetensors",
    "pytorch_model.fp16.bin",
];

/// Loads `dir/config.json` and `dir`'s weights (see [`WEIGHT_FILES`]) into a float32 CLIP text encoder on
/// `device`, normalising the key layout (see [`normalize_text_encoder_keys`]) and loading strictly.
pub fn load_text_encoder(dir: &Path, device: Device) -> Result<LoadedTextEncoder> {
    ensure!(dir.is_dir(), "CLIP text encoder folder {} not found", dir.display());
    let config_path = dir.join("config.json");
    ensure!(
        config_path.is_file(),
        "{} not found: a Hugging Face text_encoder folder holds config.json and the weights",
        config_path.display()
    );
    let (config, config_note) = ClipTextConfig::from_file_noted(&config_path)?;
    let mut notes: Vec<String> = config_note.into_iter().collect();

    let present: Vec<&str> = WEIGHT_FILES.iter().copied().filter(|f| dir.join(f).is_file()).collect();
    let Some(&chosen) = present.first() else {
        bail!("no weights in {}: expected one of {}", dir.display(), WEIGHT_FILES.join(", "));
    };
    if present.len() > 1 {
        notes.push(format!("read {chosen} (also present: {})", present[1..].join(", ")));
    } else {
        notes.push(format!("read {chosen}"));
    }
    let (mut sd, weights) = read_weights(&dir.join(chosen))?;
    notes.append(&mut sd.notes);

    let what = || format!("loading {} with the config {}", dir.join(chosen).display(), config_path.display());
    notes.extend(normalize_text_encoder_keys(&mut sd, &config).with_context(what)?);
    let mut converted: BTreeSet<String> = BTreeSet::new();
    for (_, t) in sd.iter() {
        if t.kind() != Kind::Float && t.is_floating_point() {
            converted.insert(format!("{:?}", t.kind()));
        }
    }
    if !converted.is_empty() {
        notes.push(format!("converted {} weights to float32", converted.into_iter().collect::<Vec<_>>().join("/")));
    }

    let vs = VarStore::new(device);
    let model = ClipTextModel::new(&vs.root(), &config).with_context(what)?;
    load_strict(&vs, &sd).with_context(what)?;
    Ok(LoadedTextEncoder { vs, model, config, weights, notes })
}

/// One weight file, or every shard a `*.index.json` names (merged; a key in two shards is an error).
fn read_weights(path: &Path) -> Result<(StateDict, Vec<PathBuf>)> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !name.ends_with(".index.json") {
        let sd = StateDict::load(path, None).with_context(|| format!("reading {}", path.display()))?;
        return Ok((sd, vec![path.to_path_buf()]));
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let index: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("{} has no weight_map object", path.display()))?;
    let mut shards: Vec<&str> = Vec::new();
    for (key, file) in map {
        let file =
            file.as_str().ok_or_else(|| anyhow!("{}: weight_map[{key:?}] is not a file name", path.display()))?;
        // A shard is a plain file name next to the index: no directories, so nothing outside the folder is read.
        ensure!(
            !file.contains('/') && !file.contains('\\') && file != ".." && !file.is_empty(),
            "{}: shard name {file:?} is not a file in the same folder",
            path.display()
        );
        if !shards.contains(&file) {
            shards.push(file);
        }
    }
    ensure!(!shards.is_empty(), "{} lists no shards", path.display());
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut merged = StateDict::new();
    let mut files = Vec::new();
    for shard in &shards {
        let p = dir.join(shard);
        let mut sd = StateDict::load(&p, None).with_context(|| format!("reading shard {} of {}", p.display(), name))?;
        let names: Vec<String> = sd.names().to_vec();
        for k in names {
            ensure!(!merged.contains(&k), "key {k} appears in two shards of {}", path.display());
            let t = sd.remove(&k).expect("listed");
            merged.insert(k, t);
        }
        merged.notes.append(&mut sd.notes);
        files.push(p);
    }
    merged.notes.push(format!("merged {} shards listed in {name}", shards.len()));
    Ok((merged, files))
}

/// Keys of a full `CLIPModel` (or `CLIPTextModelWithProjection`) outside the text tower.
fn is_other_tower(key: &str) -> bool {
    key.starts_with("vision_model.")
        || matches!(key, "text_projection.weight" | "visual_projection.weight" | "logit_scale")
}

/// Brings a text-encoder state dict to the transformers 4.x `CLIPTextModel` names that [`ClipTextModel`] uses,
/// returning one note per change:
///
/// - transformers >= 5 saves `CLIPTextModel` without the `text_model.` prefix (`embeddings.*`, `encoder.*`,
///   `final_layer_norm.*`): when no key has the prefix, those keys get it;
/// - a full `CLIPModel` file (`vision_model.*`, `visual_projection.weight`, `text_projection.weight`,
///   `logit_scale`) or a `CLIPTextModelWithProjection` one (`text_projection.weight`): only the text tower is kept;
/// - the `text_model.embeddings.position_ids` buffer of older files is dropped after checking that it is
///   `arange(max_position_embeddings)` (anything else is an error: the model could not honour it).
///
/// Any other key is left as it is, for the strict loader to report.
pub fn normalize_text_encoder_keys(sd: &mut StateDict, cfg: &ClipTextConfig) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let bare_roots = ["embeddings.", "encoder.", "final_layer_norm."];
    if !sd.names().iter().any(|n| n.starts_with(TEXT_MODEL_PREFIX)) {
        let bare: Vec<String> =
            sd.names().iter().filter(|n| bare_roots.iter().any(|r| n.starts_with(r))).cloned().collect();
        if !bare.is_empty() {
            for k in &bare {
                let t = sd.remove(k).expect("listed");
                sd.insert(format!("{TEXT_MODEL_PREFIX}{k}"), t);
            }
            notes.push(format!(
                "added the `{TEXT_MODEL_PREFIX}` prefix to {} keys (transformers >= 5 saves CLIPTextModel without it)",
                bare.len()
            ));
        }
    }
    let other: Vec<String> = sd.names().iter().filter(|n| is_other_tower(n)).cloned().collect();
    if !other.is_empty() {
        for k in &other {
            sd.remove(k);
        }
        let vision = other.iter().filter(|k| k.starts_with("vision_model.")).count();
        let mut parts: Vec<String> = other.iter().filter(|k| !k.starts_with("vision_model.")).cloned().collect();
        if vision > 0 {
            parts.insert(0, format!("vision_model.* ({vision} keys)"));
        }
        notes.push(format!("kept only the text tower; dropped {}", parts.join(", ")));
    }
    if let Some(ids) = sd.remove(POSITION_IDS_KEY) {
        let n = cfg.max_position_embeddings;
        let size = ids.size();
        ensure!(
            ids.numel() == n as usize && (size == [n] || size == [1, n]),
            "{POSITION_IDS_KEY} has shape {size:?}, expected [1, {n}] (max_position_embeddings)"
        );
        let expected = Tensor::arange(n, (Kind::Double, Device::Cpu));
        let got = ids.to_kind(Kind::Double).to_device(Device::Cpu).reshape([n]);
        if !got.equal(&expected) {
            let first = got.ne_tensor(&expected).nonzero().int64_value(&[0, 0]);
            bail!(
                "{POSITION_IDS_KEY} is not arange({n}): position {first} holds {} ({:?}); medgen uses positions \
                 0..{n} as transformers does",
                got.double_value(&[first]),
                ids.kind()
            );
        }
        notes.push(format!("dropped the {POSITION_IDS_KEY} buffer ({:?}, equal to arange({n}))", ids.kind()));
    }
    Ok(notes)
}
