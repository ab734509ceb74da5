//! ControlNet (2D), after MONAI 1.6.1 `monai/networks/nets/controlnet.py` and
//! monai-generative 0.2.3 `generative/networks/nets/controlnet.py`.
//!
//! Zhang and Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (2023).
//! A copy of the UNet's encoder half (same module names, so a trained UNet's weights copy
//! over), a conditioning embedding added after `conv_in`, and one zero-initialised 1x1 conv
//! per skip tensor and for the middle block.
use super::blocks::{ConvInit, ConvNd, ConvSpec, Convolution, PerLevel};
use super::diffusion_model_unet::{Conditioning, DiffusionModelUNetConfig, Encoder, EncoderSpec};
use crate::checkpoint::{self, naming, Generation, LoadReport, StateDict};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, VarStore};
use tch::Tensor;

/// Constructor arguments of MONAI's `ControlNet`, with its defaults (`num_channels` is
/// accepted for `channels`). It has no `out_channels` and no `dropout_cattn`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlNetConfig {
    pub spatial_dims: i64,
    pub in_channels: i64,
    pub num_res_blocks: PerLevel,
    #[serde(alias = "num_channels")]
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
    pub conditioning_embedding_in_channels: i64,
    /// The embedding downsamples by 2^(len - 1): the condition must be that much larger than `x`.
    pub conditioning_embedding_num_channels: Vec<i64>,
    pub include_fc: bool,
    pub use_combined_linear: bool,
    pub use_flash_attention: bool,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        let unet = DiffusionModelUNetConfig::default();
        Self {
            spatial_dims: unet.spatial_dims,
            in_channels: unet.in_channels,
            num_res_blocks: unet.num_res_blocks,
            channels: unet.channels,
            attention_levels: unet.attention_levels,
            norm_num_groups: unet.norm_num_groups,
            norm_eps: unet.norm_eps,
            resblock_updown: unet.resblock_updown,
            num_head_channels: unet.num_head_channels,
            with_conditioning: unet.with_conditioning,
            transformer_num_layers: unet.transformer_num_layers,
            cross_attention_dim: unet.cross_attention_dim,
            num_class_embeds: unet.num_class_embeds,
            upcast_attention: unet.upcast_attention,
            conditioning_embedding_in_channels: 1,
            conditioning_embedding_num_channels: vec![16, 32, 96, 256],
            include_fc: unet.include_fc,
            use_combined_linear: unet.use_combined_linear,
            use_flash_attention: unet.use_flash_attention,
        }
    }
}

impl ControlNetConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.in_channels > 0, "ControlNet: in_channels must be positive");
        ensure!(
            self.conditioning_embedding_in_channels > 0,
            "ControlNet: conditioning_embedding_in_channels must be positive"
        );
        let e = &self.conditioning_embedding_num_channels;
        ensure!(
            !e.is_empty() && e.iter().all(|&c| c > 0),
            "ControlNet: conditioning_embedding_num_channels must be non-empty and positive, got {e:?}"
        );
        self.encoder().validate("ControlNet")
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
            // MONAI's ControlNet does not take the argument: its cross-attention never drops.
            dropout_cattn: 0.0,
            include_fc: self.include_fc,
            use_combined_linear: self.use_combined_linear,
            use_flash_attention: self.use_flash_attention,
        }
    }

    /// Does a UNet with config `unet` have the encoder this ControlNet copies? Names the first
    /// argument that differs.
    pub fn matches_unet(&self, unet: &DiffusionModelUNetConfig) -> Result<()> {
        let (a, b) = (self.encoder(), unet.encoder());
        let n = a.levels();
        let fields: [(&str, String, String); 15] = [
            ("in_channels", format!("{}", a.in_channels), format!("{}", b.in_channels)),
            ("channels", format!("{:?}", a.channels), format!("{:?}", b.channels)),
            (
                "num_res_blocks",
                format!("{:?}", a.num_res_blocks.expand(n)),
                format!("{:?}", b.num_res_blocks.expand(n)),
            ),
            ("attention_levels", format!("{:?}", a.attention_levels), format!("{:?}", b.attention_levels)),
            ("norm_num_groups", format!("{}", a.norm_num_groups), format!("{}", b.norm_num_groups)),
            ("norm_eps", format!("{}", a.norm_eps), format!("{}", b.norm_eps)),
            ("resblock_updown", format!("{}", a.resblock_updown), format!("{}", b.resblock_updown)),
            (
                "num_head_channels",
                format!("{:?}", a.num_head_channels.expand(n)),
                format!("{:?}", b.num_head_channels.expand(n)),
            ),
            ("with_conditioning", format!("{}", a.with_conditioning), format!("{}", b.with_conditioning)),
            (
                "transformer_num_layers",
                format!("{}", a.transformer_num_layers),
                format!("{}", b.transformer_num_layers),
            ),
            ("cross_attention_dim", format!("{:?}", a.cross_attention_dim), format!("{:?}", b.cross_attention_dim)),
            ("num_class_embeds", format!("{:?}", a.num_class_embeds), format!("{:?}", b.num_class_embeds)),
            ("upcast_attention", format!("{}", a.upcast_attention), format!("{}", b.upcast_attention)),
            ("include_fc", format!("{}", a.include_fc), format!("{}", b.include_fc)),
            ("use_combined_linear", format!("{}", a.use_combined_linear), format!("{}", b.use_combined_linear)),
        ];
        for (name, cn, un) in fields {
            ensure!(cn == un, "the ControlNet's {name} ({cn}) differs from the UNet's ({un})");
        }
        Ok(())
    }
}

/// `ControlNetConditioningEmbedding`: 3x3 convs, every second one stride 2, each followed by
/// the activation, then a zero-initialised 3x3 conv to the UNet's first width.
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: Convolution,
    blocks: Vec<Convolution>,
    conv_out: Convolution,
    generation: Generation,
}

impl ConditioningEmbedding {
    fn new(p: &nn::Path, d: i64, cin: i64, channels: &[i64], cout: i64, generation: Generation) -> Self {
        let mut blocks = Vec::new();
        for w in channels.windows(2) {
            let n = blocks.len();
            blocks.push(Convolution::new(&(p / "blocks" / n), ConvSpec::new(d, w[0], w[0], 3, 1, 1)));
            blocks.push(Convolution::new(&(p / "blocks" / (n + 1)), ConvSpec::new(d, w[0], w[1], 3, 2, 1)));
        }
        let last = *channels.last().unwrap();
        Self {
            conv_in: Convolution::new(&(p / "conv_in"), ConvSpec::new(d, cin, channels[0], 3, 1, 1)),
            blocks,
            conv_out: Convolution::zeroed(&(p / "conv_out"), ConvSpec::new(d, last, cout, 3, 1, 1)),
            generation,
        }
    }

    /// monai-generative applies `F.silu`; MONAI's `Convolution(act="SWISH")` computes
    /// `x * sigmoid(x)`, which differs in the last bits.
    fn act(&self, x: Tensor) -> Tensor {
        match self.generation {
            Generation::Generative => x.silu(),
            Generation::Monai => &x * x.sigmoid(),
        }
    }

    fn forward(&self, cond: &Tensor) -> Tensor {
        let mut h = self.act(cond.apply(&self.conv_in));
        for b in &self.blocks {
            h = self.act(h.apply(b));
        }
        h.apply(&self.conv_out)
    }
}

/// One zero conv per skip tensor. Entry 0 is a bare `nn.Conv{2,3}d` in both libraries (keys
/// `controlnet_down_blocks.0.weight`), the others `Convolution`s (`.N.conv.weight`).
#[derive(Debug)]
enum ZeroConv {
    Bare(ConvNd),
    Wrapped(Convolution),
}

impl ZeroConv {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            ZeroConv::Bare(c) => x.apply(c),
            ZeroConv::Wrapped(c) => x.apply(c),
        }
    }
}

#[derive(Debug)]
pub struct ControlNet {
    encoder: Encoder,
    controlnet_cond_embedding: ConditioningEmbedding,
    controlnet_down_blocks: Vec<ZeroConv>,
    controlnet_mid_block: Convolution,
    config: ControlNetConfig,
}

/// The residuals a ControlNet hands to the UNet.
pub struct ControlNetOutput {
    /// One per entry of the UNet's skip list (`down_block_additional_residuals`).
    pub down_block_res_samples: Vec<Tensor>,
    /// `mid_block_additional_residual`.
    pub mid_block_res_sample: Tensor,
}

impl ControlNetOutput {
    /// The UNet inputs carrying these residuals, plus the given context and class labels.
    pub fn conditioning<'a>(
        &'a self,
        context: Option<&'a Tensor>,
        class_labels: Option<&'a Tensor>,
    ) -> Conditioning<'a> {
        Conditioning {
            context,
            class_labels,
            down_block_additional_residuals: Some(&self.down_block_res_samples),
            mid_block_additional_residual: Some(&self.mid_block_res_sample),
        }
    }
}

impl ControlNet {
    pub fn new(p: &nn::Path, config: &ControlNetConfig, generation: Generation) -> Result<Self> {
        config.validate()?;
        let spec = config.encoder();
        let encoder = Encoder::new(p, &spec, generation);
        let zp = p / "controlnet_down_blocks";
        let d = spec.spatial_dims;
        let controlnet_down_blocks = encoder
            .skip_channels()
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    ZeroConv::Bare(ConvNd::new(&(&zp / 0), ConvSpec::new(d, c, c, 1, 1, 0), ConvInit::Zero))
                } else {
                    ZeroConv::Wrapped(Convolution::zeroed(&(&zp / i), ConvSpec::new(d, c, c, 1, 1, 0)))
                }
            })
            .collect();
        let last = *spec.channels.last().unwrap();
        Ok(Self {
            controlnet_cond_embedding: ConditioningEmbedding::new(
                &(p / "controlnet_cond_embedding"),
                d,
                config.conditioning_embedding_in_channels,
                &config.conditioning_embedding_num_channels,
                spec.channels[0],
                generation,
            ),
            controlnet_down_blocks,
            controlnet_mid_block: Convolution::zeroed(
                &(p / "controlnet_mid_block"),
                ConvSpec::new(d, last, last, 1, 1, 0),
            ),
            encoder,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// How much larger than `x` the condition must be (each side).
    pub fn conditioning_downsampling(&self) -> i64 {
        1 << (self.config.conditioning_embedding_num_channels.len() - 1)
    }

    /// The residuals for `x` at `timesteps` under the control image `controlnet_cond`,
    /// scaled by `conditioning_scale`. `cond` carries `context` and `class_labels`; its
    /// residual fields must be empty.
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        controlnet_cond: &Tensor,
        conditioning_scale: f64,
        cond: &Conditioning,
    ) -> Result<ControlNetOutput> {
        let context = self.prepare_inputs(x, timesteps, cond)?;
        self.check_cond(x, controlnet_cond)?;
        let embedded = self.embed_condition(controlnet_cond)?;
        self.forward_from(x, timesteps, &embedded, conditioning_scale, cond, context.as_ref())
    }

    /// The control image through `controlnet_cond_embedding`: `(batch, first UNet width, h, w)`
    /// at the latent's size. It depends on neither the timestep nor the text, so a sampling
    /// loop computes it once and passes it to `forward_embedded` at every step.
    pub fn embed_condition(&self, controlnet_cond: &Tensor) -> Result<Tensor> {
        let cs = controlnet_cond.size();
        let cin = self.config.conditioning_embedding_in_channels;
        let rank = 2 + self.config.spatial_dims as usize;
        ensure!(
            cs.len() == rank && cs[1] == cin,
            "ControlNet: controlnet_cond must be (batch, {cin} channels, {}), got shape {cs:?}",
            if rank == 4 { "H, W" } else { "H, W, D" }
        );
        Ok(self.controlnet_cond_embedding.forward(controlnet_cond))
    }

    /// `forward` with the control image already through `embed_condition`.
    pub fn forward_embedded(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        embedded_cond: &Tensor,
        conditioning_scale: f64,
        cond: &Conditioning,
    ) -> Result<ControlNetOutput> {
        let context = self.prepare_inputs(x, timesteps, cond)?;
        let (xs, es) = (x.size(), embedded_cond.size());
        let width = self.config.channels[0];
        ensure!(
            es.len() == xs.len() && es[0] == xs[0] && es[1] == width && es[2..] == xs[2..],
            "ControlNet: the embedded control image must be (batch {}, {width}, {:?}) as x, got shape {es:?}",
            xs[0],
            &xs[2..]
        );
        self.forward_from(x, timesteps, embedded_cond, conditioning_scale, cond, context.as_ref())
    }

    /// The checks both forwards start with (residual fields empty; x, timesteps, context), and
    /// the context as the blocks take it.
    fn prepare_inputs(&self, x: &Tensor, timesteps: &Tensor, cond: &Conditioning) -> Result<Option<Tensor>> {
        ensure!(
            cond.down_block_additional_residuals.is_none() && cond.mid_block_additional_residual.is_none(),
            "ControlNet takes no additional residuals"
        );
        self.encoder.prepare_inputs("ControlNet", x, timesteps, cond)
    }

    /// The network from the embedded control image on, its inputs checked.
    fn forward_from(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        embedded_cond: &Tensor,
        conditioning_scale: f64,
        cond: &Conditioning,
        context: Option<&Tensor>,
    ) -> Result<ControlNetOutput> {
        let enc = &self.encoder;
        let emb = enc.embedding(x, timesteps, cond.class_labels)?;
        let h = enc.conv_in(x) + embedded_cond;
        let (h, skips) = enc.down(h, &emb, context, false);
        let h = enc.middle_block.forward_t(&h, &emb, context, false);
        let down_block_res_samples =
            skips.iter().zip(&self.controlnet_down_blocks).map(|(s, z)| z.forward(s) * conditioning_scale).collect();
        let mid_block_res_sample = h.apply(&self.controlnet_mid_block) * conditioning_scale;
        Ok(ControlNetOutput { down_block_res_samples, mid_block_res_sample })
    }

    /// `controlnet_cond` against `x`: same batch, the embedding's input channels, and H, W that
    /// the embedding's stride-2 convs reduce to x's.
    pub fn check_cond(&self, x: &Tensor, controlnet_cond: &Tensor) -> Result<()> {
        let (xs, cs) = (x.size(), controlnet_cond.size());
        let rank = 2 + self.config.spatial_dims as usize;
        ensure!(xs.len() == rank, "ControlNet: x must be {}, got shape {xs:?}", self.config.encoder().layout());
        let f = self.conditioning_downsampling();
        let strides = self.config.conditioning_embedding_num_channels.len() - 1;
        // Each 3x3 stride-2 conv with padding 1 maps n to ceil(n / 2).
        let embedded = |n: i64| (0..strides).fold(n, |n, _| (n + 1) / 2);
        ensure!(
            cs.len() == rank
                && cs[0] == xs[0]
                && cs[1] == self.config.conditioning_embedding_in_channels
                && cs[2..].iter().zip(&xs[2..]).all(|(&c, &x)| embedded(c) == x),
            "ControlNet: controlnet_cond must be (batch {}, {} channels, spatial size) with the spatial size reduced \
             to x's {:?} by the conditioning embedding's {strides} stride-2 convs (e.g. {:?}), got shape {cs:?}",
            xs[0],
            self.config.conditioning_embedding_in_channels,
            &xs[2..],
            xs[2..].iter().map(|&n| n * f).collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Initialises the ControlNet in `vs` from a trained UNet's state dict, as the reference
    /// does with `controlnet.load_state_dict(unet.state_dict(), strict=False)`: every tensor
    /// with the same name and shape is copied (`conv_in`, `time_embed`, `class_embedding`,
    /// `down_blocks`, `middle_block`). A monai-generative UNet is renamed first, so its
    /// attention weights are copied too (MONAI's own `load_old_state_dict` leaves the
    /// spatial attention q/k/v of an unconditioned ControlNet random). The report lists what
    /// was copied and what was not; anything but the ControlNet's own layers missing, or a
    /// shape mismatch, is an error.
    pub fn init_from_unet(vs: &VarStore, unet: StateDict) -> Result<LoadReport> {
        let shapes = checkpoint::model_shapes(vs);
        let sd = match Generation::of(&unet) {
            Generation::Generative => naming::rename_generative(unet, &shapes),
            Generation::Monai => unet,
        };
        let plan = checkpoint::plan_partial(vs, &sd);
        let foreign_missing = plan.missing.iter().any(|(k, _)| !k.starts_with("controlnet_"));
        ensure!(
            !foreign_missing && plan.mismatched.is_empty(),
            "the UNet does not fit this ControlNet (nothing was copied): {}",
            plan.describe()
        );
        checkpoint::load_partial(vs, &sd)
    }
}
