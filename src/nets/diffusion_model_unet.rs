//! DiffusionModelUNet (2D), after MONAI 1.6.1 `monai/networks/nets/diffusion_model_unet.py`
//! and monai-generative 0.2.3 `generative/networks/nets/diffusion_model_unet.py` (same
//! architecture, two naming generations; see `checkpoint::naming`).
//!
//! The encoder half (time embedding, `conv_in`, down blocks, middle block) is public to the
//! crate because the ControlNet is built from the very same modules.
use super::blocks::{group_norm, ConvSpec, Convolution, PerLevel};
use super::unet_blocks::{DownBlock, Level, MidBlock, UpBlock};
use crate::checkpoint::Generation;
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

/// Constructor arguments of MONAI's `DiffusionModelUNet`, with its defaults. The
/// monai-generative name `num_channels` is accepted as an alias of `channels`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionModelUNetConfig {
    pub spatial_dims: i64,
    pub in_channels: i64,
    pub out_channels: i64,
    pub num_res_blocks: PerLevel,
    #[serde(alias = "num_channels")]
    pub channels: Vec<i64>,
    pub attention_levels: Vec<bool>,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub resblock_updown: bool,
    /// Channels per head (`heads = channels[i] / num_head_channels[i]`). Ignored, and may be 0,
    /// at levels without attention; the last entry always serves the middle block.
    pub num_head_channels: PerLevel,
    pub with_conditioning: bool,
    pub transformer_num_layers: i64,
    pub cross_attention_dim: Option<i64>,
    pub num_class_embeds: Option<i64>,
    pub upcast_attention: bool,
    pub dropout_cattn: f64,
    pub include_fc: bool,
    pub use_combined_linear: bool,
    pub use_flash_attention: bool,
}

impl Default for DiffusionModelUNetConfig {
    fn default() -> Self {
        Self {
            spatial_dims: 2,
            in_channels: 1,
            out_channels: 1,
            num_res_blocks: PerLevel::Each(vec![2, 2, 2, 2]),
            channels: vec![32, 64, 64, 64],
            attention_levels: vec![false, false, true, true],
            norm_num_groups: 32,
            norm_eps: 1e-6,
            resblock_updown: false,
            num_head_channels: PerLevel::Same(8),
            with_conditioning: false,
            transformer_num_layers: 1,
            cross_attention_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            dropout_cattn: 0.0,
            include_fc: true,
            use_combined_linear: false,
            use_flash_attention: false,
        }
    }
}

impl DiffusionModelUNetConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.in_channels > 0 && self.out_channels > 0, "DiffusionModelUNet: channel counts must be positive");
        ensure!(
            (0.0..=1.0).contains(&self.dropout_cattn),
            "DiffusionModelUNet: dropout_cattn must be in [0, 1], got {}",
            self.dropout_cattn
        );
        self.encoder().validate("DiffusionModelUNet")
    }

    pub(crate) fn encoder(&self) -> EncoderSpec {
        EncoderSpec {
            spatial_dims: self.spatial_dims,
            in_channels: self.in_channels,
            num_res_blocks: self.num_res_blocks.clone(),
            channels: self.channels.clone(),
            attention_levels: self.attention_levels.clone(),
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            resblock_updown: self.resblock_updown,
            num_head_channels: self.num_head_channels.clone(),
            with_conditioning: self.with_conditioning,
            transformer_num_layers: self.transformer_num_layers,
            cross_attention_dim: self.cross_attention_dim,
            num_class_embeds: self.num_class_embeds,
            upcast_attention: self.upcast_attention,
            dropout_cattn: self.dropout_cattn,
            include_fc: self.include_fc,
            use_combined_linear: self.use_combined_linear,
            use_flash_attention: self.use_flash_attention,
        }
    }
}

/// The arguments the UNet and the ControlNet share: everything that builds the encoder half.
#[derive(Debug, Clone)]
pub(crate) struct EncoderSpec {
    pub spatial_dims: i64,
    pub in_channels: i64,
    pub num_res_blocks: PerLevel,
    pub channels: Vec<i64>,
    pub attention_levels: Vec<bool>,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub resblock_updown: bool,
    pub num_head_channels: PerLevel,
    pub with_conditioning: bool,
    pub transformer_num_layers: i64,
    pub cross_attention_dim: Option<i64>,
    pub num_class_embeds: Option<i64>,
    pub upcast_attention: bool,
    pub dropout_cattn: f64,
    pub include_fc: bool,
    pub use_combined_linear: bool,
    pub use_flash_attention: bool,
}

impl EncoderSpec {
    /// The input layout, for error messages.
    pub fn layout(&self) -> &'static str {
        match self.spatial_dims {
            2 => "(batch, channels, height, width)",
            _ => "(batch, channels, height, width, depth)",
        }
    }

    /// MONAI's constructor checks, plus the ones that would otherwise surface as a division
    /// by zero or a shape error deep inside a forward pass.
    pub fn validate(&self, model: &str) -> Result<()> {
        ensure!(matches!(self.spatial_dims, 2 | 3), "{model}: spatial_dims must be 2 or 3, got {}", self.spatial_dims);
        ensure!(!self.channels.is_empty(), "{model}: channels must not be empty");
        ensure!(self.norm_num_groups > 0, "{model}: norm_num_groups must be positive");
        ensure!(self.channels.iter().all(|&c| c > 0), "{model}: channels must be positive, got {:?}", self.channels);
        if let Some(c) = self.channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            bail!(
                "{model} expects all channels being multiple of norm_num_groups: {c} is not a multiple of {}",
                self.norm_num_groups
            );
        }
        let levels = self.channels.len();
        ensure!(
            self.attention_levels.len() == levels,
            "{model} expects channels ({levels}) and attention_levels ({}) of the same length",
            self.attention_levels.len()
        );
        match (self.with_conditioning, self.cross_attention_dim) {
            (true, None) => bail!("{model}: with_conditioning = true needs cross_attention_dim"),
            (false, Some(_)) => bail!("{model}: cross_attention_dim is given, so with_conditioning must be true"),
            (_, Some(d)) if d <= 0 => bail!("{model}: cross_attention_dim must be positive, got {d}"),
            _ => {}
        }
        let nrb = self.num_res_blocks.expand(levels);
        ensure!(
            nrb.len() == levels && nrb.iter().all(|&n| n >= 0),
            "{model}: num_res_blocks must be one non-negative integer or one per level ({levels}), got {nrb:?}"
        );
        let nhc = self.num_head_channels.expand(levels);
        ensure!(
            nhc.len() == levels,
            "{model}: num_head_channels must be one integer or one per level ({levels}), got {nhc:?}"
        );
        // A level without ResnetBlocks passes its input through, which only fits if the width
        // does not change there (MONAI fails in the forward pass otherwise).
        for (i, w) in self.channels.windows(2).enumerate() {
            ensure!(
                nrb[i + 1] > 0 || w[0] == w[1],
                "{model}: num_res_blocks[{}] = 0 needs channels[{}] == channels[{i}], got {:?}",
                i + 1,
                i + 1,
                self.channels
            );
        }
        ensure!(self.transformer_num_layers >= 0, "{model}: transformer_num_layers must not be negative");
        if let Some(k) = self.num_class_embeds {
            ensure!(k > 0, "{model}: num_class_embeds must be positive, got {k}");
        }
        // The middle block always has attention, with the last level's head width.
        for (i, (&c, &h)) in self.channels.iter().zip(&nhc).enumerate() {
            if !(self.attention_levels[i] || i == levels - 1) {
                continue;
            }
            let where_ = if self.attention_levels[i] { format!("level {i}") } else { "the middle block".into() };
            ensure!(
                h > 0 && h <= c,
                "{model}: num_head_channels[{i}] = {h} gives no attention head for {where_} ({c} channels)"
            );
            if !self.with_conditioning {
                ensure!(
                    c % (c / h) == 0,
                    "{model}: {c} channels at {where_} do not split into {} heads (num_head_channels {h})",
                    c / h
                );
            }
        }
        Ok(())
    }

    /// The width each transformer attends at (`heads * num_head_channels`), levels then the
    /// middle block.
    pub fn attention_widths(&self) -> Vec<i64> {
        let nhc = self.num_head_channels.expand(self.levels());
        let last = self.levels() - 1;
        let inner = |i: usize| self.channels[i] / nhc[i] * nhc[i];
        (0..self.levels()).filter(|&i| self.attention_levels[i]).map(inner).chain([inner(last)]).collect()
    }

    pub fn levels(&self) -> usize {
        self.channels.len()
    }

    pub fn time_embed_dim(&self) -> i64 {
        4 * self.channels[0]
    }
}

/// Sinusoidal timestep embedding, cosines first, in float32: `get_timestep_embedding` of
/// both libraries (diffusers' `flip_sin_to_cos=True, downscale_freq_shift=0`).
pub fn get_timestep_embedding(timesteps: &Tensor, embedding_dim: i64, max_period: f64) -> Result<Tensor> {
    ensure!(timesteps.dim() == 1, "Timesteps should be a 1d-array, got shape {:?}", timesteps.size());
    let half_dim = embedding_dim / 2;
    let exponent = Tensor::arange(half_dim, (Kind::Float, timesteps.device())) * (-max_period.ln());
    let freqs = (exponent / half_dim as f64).exp();
    let args = timesteps.unsqueeze(1).to_kind(Kind::Float) * freqs.unsqueeze(0);
    let embedding = Tensor::cat(&[args.cos(), args.sin()], -1);
    Ok(if embedding_dim % 2 == 1 { embedding.constant_pad_nd([0, 1, 0, 0]) } else { embedding })
}

/// What the UNet and the ControlNet share, under the same names: `conv_in`, `time_embed`,
/// `class_embedding`, `down_blocks`, `middle_block`.
#[derive(Debug)]
pub(crate) struct Encoder {
    pub spec: EncoderSpec,
    conv_in: Convolution,
    time_embed_0: nn::Linear,
    time_embed_2: nn::Linear,
    class_embedding: Option<nn::Embedding>,
    pub down_blocks: Vec<DownBlock>,
    pub middle_block: MidBlock,
}

impl Encoder {
    pub fn new(p: &nn::Path, spec: &EncoderSpec, generation: Generation) -> Self {
        let ch = &spec.channels;
        let levels = spec.levels();
        let nrb = spec.num_res_blocks.expand(levels);
        let nhc = spec.num_head_channels.expand(levels);
        let temb = spec.time_embed_dim();
        let mut down_blocks = Vec::new();
        let mut out_c = ch[0];
        for i in 0..levels {
            let in_c = out_c;
            out_c = ch[i];
            let level = Level {
                in_c,
                out_c,
                num_res_blocks: nrb[i],
                attention: spec.attention_levels[i],
                num_head_channels: nhc[i],
                resample: i + 1 < levels,
            };
            down_blocks.push(DownBlock::new(&(p / "down_blocks" / i), &level, spec, generation));
        }
        let middle_block = MidBlock::new(&(p / "middle_block"), ch[levels - 1], nhc[levels - 1], spec, generation);
        let lin = |n: &str, i, o| super::blocks::linear(p / "time_embed" / n, i, o, true);
        Self {
            spec: spec.clone(),
            conv_in: Convolution::new(
                &(p / "conv_in"),
                ConvSpec::new(spec.spatial_dims, spec.in_channels, ch[0], 3, 1, 1),
            ),
            time_embed_0: lin("0", ch[0], temb),
            time_embed_2: lin("2", temb, temb),
            class_embedding: spec
                .num_class_embeds
                .map(|k| nn::embedding(p / "class_embedding", k, temb, Default::default())),
            down_blocks,
            middle_block,
        }
    }

    /// Channels of each tensor of the skip list, in order.
    pub fn skip_channels(&self) -> Vec<i64> {
        let spec = &self.spec;
        let nrb = spec.num_res_blocks.expand(spec.levels());
        let mut out = vec![spec.channels[0]];
        for (i, &c) in spec.channels.iter().enumerate() {
            out.extend(std::iter::repeat_n(c, nrb[i] as usize));
            if i + 1 < spec.levels() {
                out.push(c);
            }
        }
        out
    }

    /// Checks what MONAI would only find out deep inside the network, with a clear message,
    /// and returns the context expanded to the batch (a batch-1 context serves every sample).
    pub fn prepare_inputs(
        &self,
        model: &str,
        x: &Tensor,
        timesteps: &Tensor,
        cond: &Conditioning,
    ) -> Result<Option<Tensor>> {
        let spec = &self.spec;
        let s = x.size();
        ensure!(s.len() == 2 + spec.spatial_dims as usize, "{model}: x must be {}, got shape {s:?}", spec.layout());
        ensure!(s[1] == spec.in_channels, "{model}: x must have {} channels, got shape {s:?}", spec.in_channels);
        let factor = 1i64 << (spec.levels() - 1);
        ensure!(
            s[2..].iter().all(|&n| n > 0 && n % factor == 0),
            "{model}: the spatial size of x {:?} must be divisible by {factor} (2^(levels-1))",
            &s[2..]
        );
        let t = timesteps.size();
        ensure!(
            t.len() == 1 && (t[0] == 1 || t[0] == s[0]),
            "{model}: timesteps must be 1-D with one entry per batch element or a single one (batch {}), got shape {t:?}",
            s[0]
        );
        let context = match (cond.context, spec.cross_attention_dim) {
            (Some(_), None) => bail!("{model}: a context was given but the model has with_conditioning = false"),
            (Some(c), Some(d)) => {
                let cs = c.size();
                ensure!(
                    cs.len() == 3 && cs[2] == d && (cs[0] == s[0] || cs[0] == 1),
                    "{model}: context must be (batch {} or 1, tokens, cross_attention_dim {d}), got shape {cs:?}",
                    s[0]
                );
                Some(c.expand([s[0], cs[1], cs[2]], false))
            }
            (None, Some(d)) => {
                // Without a context the cross-attention attends to the features themselves, which
                // only fits where their width is cross_attention_dim.
                let widths = spec.attention_widths();
                ensure!(
                    widths.iter().all(|&w| w == d),
                    "{model}: the model is conditioned (cross_attention_dim {d}) and needs a context; \
                     without one its attention widths {widths:?} would have to equal {d}"
                );
                None
            }
            (None, None) => None,
        };
        match (cond.class_labels, spec.num_class_embeds) {
            (None, Some(_)) => bail!("{model}: class_labels should be provided when num_class_embeds is set"),
            (Some(l), Some(k)) => {
                ensure!(
                    l.dim() == 1 && (l.size()[0] == s[0] || l.size()[0] == 1),
                    "{model}: class_labels must be 1-D with one label per batch element (batch {}), got shape {:?}",
                    s[0],
                    l.size()
                );
                ensure!(
                    l.kind() == Kind::Int64 || l.kind() == Kind::Int,
                    "{model}: class_labels must be integers, got {:?}",
                    l.kind()
                );
                // Reading device labels back would stop the device at every forward pass (every sampling step):
                // their range is checked while they are on the CPU, before they are moved.
                if l.numel() > 0 && l.device() == tch::Device::Cpu {
                    let (lo, hi) = (i64::try_from(l.min())?, i64::try_from(l.max())?);
                    ensure!(lo >= 0 && hi < k, "{model}: class_labels must be in [0, {k}), got values in [{lo}, {hi}]");
                }
            }
            (Some(_), None) => bail!("{model}: class_labels were given but the model has no num_class_embeds"),
            (None, None) => {}
        }
        Ok(context)
    }

    /// `time_embed(get_timestep_embedding(t))`, plus the class embedding.
    pub fn embedding(&self, x: &Tensor, timesteps: &Tensor, class_labels: Option<&Tensor>) -> Result<Tensor> {
        let t_emb = get_timestep_embedding(timesteps, self.spec.channels[0], 10000.0)?.to_kind(x.kind());
        let emb = t_emb.apply(&self.time_embed_0).silu().apply(&self.time_embed_2);
        Ok(match (&self.class_embedding, class_labels) {
            (Some(e), Some(l)) => emb + l.apply(e).to_kind(x.kind()),
            _ => emb,
        })
    }

    pub fn conv_in(&self, x: &Tensor) -> Tensor {
        x.apply(&self.conv_in)
    }

    /// Runs the down blocks from `h` (the output of `conv_in`), returning the last hidden
    /// state and the skip list.
    pub fn down(&self, h: Tensor, emb: &Tensor, context: Option<&Tensor>, train: bool) -> (Tensor, Vec<Tensor>) {
        let mut skips = vec![h.shallow_clone()];
        let mut h = h;
        for block in &self.down_blocks {
            let (next, res) = block.forward_t(&h, emb, context, train);
            h = next;
            skips.extend(res);
        }
        (h, skips)
    }
}

/// Optional inputs of [`DiffusionModelUNet::forward_t`], named as MONAI's arguments.
#[derive(Default, Clone, Copy)]
pub struct Conditioning<'a> {
    /// `(batch, tokens, cross_attention_dim)`.
    pub context: Option<&'a Tensor>,
    /// `(batch,)` int64, when the model has `num_class_embeds`.
    pub class_labels: Option<&'a Tensor>,
    /// The ControlNet outputs: one tensor per entry of the skip list, added to it.
    pub down_block_additional_residuals: Option<&'a [Tensor]>,
    /// Added to the middle block's output.
    pub mid_block_additional_residual: Option<&'a Tensor>,
}

#[derive(Debug)]
pub struct DiffusionModelUNet {
    pub(crate) encoder: Encoder,
    up_blocks: Vec<UpBlock>,
    out_0: nn::GroupNorm,
    out_2: Convolution,
    config: DiffusionModelUNetConfig,
}

impl DiffusionModelUNet {
    /// Builds the network under `p` (usually `vs.root()`). `generation` selects each
    /// library's attention formula (equal up to float rounding) and, for monai-generative,
    /// the self-attention output layer of the transformer blocks it always has.
    pub fn new(p: &nn::Path, config: &DiffusionModelUNetConfig, generation: Generation) -> Result<Self> {
        config.validate()?;
        let spec = config.encoder();
        let encoder = Encoder::new(p, &spec, generation);
        let levels = spec.levels();
        let rev: Vec<i64> = spec.channels.iter().rev().copied().collect();
        let rev_nrb: Vec<i64> = spec.num_res_blocks.expand(levels).into_iter().rev().collect();
        let rev_attn: Vec<bool> = spec.attention_levels.iter().rev().copied().collect();
        let rev_nhc: Vec<i64> = spec.num_head_channels.expand(levels).into_iter().rev().collect();
        let mut up_blocks = Vec::new();
        let mut out_c = rev[0];
        for i in 0..levels {
            let prev_c = out_c;
            out_c = rev[i];
            // `in_c` is the width of the skip tensor the last ResnetBlock of the level takes.
            let level = Level {
                in_c: rev[(i + 1).min(levels - 1)],
                out_c,
                num_res_blocks: rev_nrb[i] + 1,
                attention: rev_attn[i],
                num_head_channels: rev_nhc[i],
                resample: i + 1 < levels,
            };
            up_blocks.push(UpBlock::new(&(p / "up_blocks" / i), prev_c, &level, &spec, generation));
        }
        let ch0 = spec.channels[0];
        Ok(Self {
            encoder,
            up_blocks,
            out_0: group_norm(&(p / "out" / "0"), spec.norm_num_groups, ch0, spec.norm_eps),
            out_2: Convolution::zeroed(
                &(p / "out" / "2"),
                ConvSpec::new(spec.spatial_dims, ch0, config.out_channels, 3, 1, 1),
            ),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &DiffusionModelUNetConfig {
        &self.config
    }

    /// The prediction for `x` at `timesteps` (shape `(batch,)`, or `(1,)` for all).
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        self.forward_t(x, timesteps, cond, false)
    }

    /// `forward` with dropout (`dropout_cattn`) active when `train`.
    pub fn forward_t(&self, x: &Tensor, timesteps: &Tensor, cond: &Conditioning, train: bool) -> Result<Tensor> {
        let enc = &self.encoder;
        let context = enc.prepare_inputs("DiffusionModelUNet", x, timesteps, cond)?;
        let context = context.as_ref();
        let emb = enc.embedding(x, timesteps, cond.class_labels)?;
        let (h, mut skips) = enc.down(enc.conv_in(x), &emb, context, train);
        if let Some(res) = cond.down_block_additional_residuals {
            // MONAI zips the two lists and silently drops the surplus of the longer one;
            // a count or shape mismatch is a wiring error, so medgen refuses it.
            ensure!(
                res.len() == skips.len(),
                "DiffusionModelUNet: {} down-block residuals given, the model has {} skip tensors",
                res.len(),
                skips.len()
            );
            for (i, (s, r)) in skips.iter_mut().zip(res).enumerate() {
                ensure!(
                    s.size() == r.size(),
                    "DiffusionModelUNet: down-block residual {i} has shape {:?}, the skip tensor has {:?}",
                    r.size(),
                    s.size()
                );
                *s = &*s + r;
            }
        }
        let mut h = enc.middle_block.forward_t(&h, &emb, context, train);
        if let Some(r) = cond.mid_block_additional_residual {
            ensure!(
                r.size() == h.size(),
                "DiffusionModelUNet: mid-block residual has shape {:?}, the middle block output has {:?}",
                r.size(),
                h.size()
            );
            // Not `+=`: an in-place add would overwrite a tensor autograd may still need.
            h = &h + r;
        }
        for block in &self.up_blocks {
            h = block.forward_t(&h, &mut skips, &emb, context, train);
        }
        Ok(h.apply(&self.out_0).silu().apply(&self.out_2))
    }
}
