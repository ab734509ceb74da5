//! The blocks of the DiffusionModelUNet (and of the ControlNet's encoder half), after MONAI
//! 1.6.1 `diffusion_model_unet.py`: ResnetBlocks, spatial self-attention, SpatialTransformers,
//! and the down, middle and up blocks built from them. Field and path names are MONAI's.
use super::blocks::{
    avg_pool_x2, group_norm, linear, upsample_nearest_x2, AttentionMath, AttentionOptions, ConvSpec, Convolution,
    CrossAttentionBlock, SABlock, SABlockConfig, SpatialAttentionBlock,
};
use super::diffusion_model_unet::EncoderSpec;
use crate::checkpoint::Generation;
use tch::nn;
use tch::Tensor;

/// The shape of one level of the UNet, as MONAI's `get_down_block` / `get_up_block` take it.
pub(crate) struct Level {
    /// Down: the input width. Up: the width of the skip tensor the last ResnetBlock takes.
    pub in_c: i64,
    pub out_c: i64,
    pub num_res_blocks: i64,
    pub attention: bool,
    pub num_head_channels: i64,
    /// Whether the level ends with a downsampler (down) or an upsampler (up).
    pub resample: bool,
}

/// `DiffusionUNetResnetBlock` (old: `ResnetBlock`).
#[derive(Debug)]
pub(crate) struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: Convolution,
    time_emb_proj: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: Convolution,
    skip_connection: Option<Convolution>,
    resample: Resample,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Resample {
    None,
    /// Nearest x2 of both branches (`resblock_updown` upsampler).
    Up,
    /// 2x2 average pooling of both branches (`resblock_updown` downsampler).
    Down,
}

impl ResnetBlock {
    fn new(p: &nn::Path, cin: i64, cout: i64, temb: i64, spec: &EncoderSpec, resample: Resample) -> Self {
        let (d, g, eps) = (spec.spatial_dims, spec.norm_num_groups, spec.norm_eps);
        Self {
            norm1: group_norm(&(p / "norm1"), g, cin, eps),
            conv1: Convolution::new(&(p / "conv1"), ConvSpec::new(d, cin, cout, 3, 1, 1)),
            time_emb_proj: linear(p / "time_emb_proj", temb, cout, true),
            norm2: group_norm(&(p / "norm2"), g, cout, eps),
            conv2: Convolution::zeroed(&(p / "conv2"), ConvSpec::new(d, cout, cout, 3, 1, 1)),
            skip_connection: (cin != cout)
                .then(|| Convolution::new(&(p / "skip_connection"), ConvSpec::new(d, cin, cout, 1, 1, 0))),
            resample,
        }
    }

    fn forward(&self, x: &Tensor, emb: &Tensor) -> Tensor {
        let mut h = x.apply(&self.norm1).silu();
        let x = match self.resample {
            Resample::None => x.shallow_clone(),
            Resample::Up => {
                h = upsample_nearest_x2(&h);
                upsample_nearest_x2(x)
            }
            Resample::Down => {
                h = avg_pool_x2(&h);
                avg_pool_x2(x)
            }
        };
        // A batch-1 embedding broadcasts over the batch: the samplers pass one timestep. One trailing unit
        // dimension per spatial one (`temb[:, :, None, None]`, 3-D: `[..., None, None, None]`).
        let temb = (2..x.dim()).fold(emb.silu().apply(&self.time_emb_proj), |t, _| t.unsqueeze(-1));
        let h = h.apply(&self.conv1) + temb;
        let h = h.apply(&self.norm2).silu().apply(&self.conv2);
        match &self.skip_connection {
            Some(s) => x.apply(s) + h,
            None => x + h,
        }
    }
}

/// GEGLU feed-forward (`MLPBlock(act="GEGLU")`): the first half of `linear1` is the value,
/// the second the gate, through the exact (erf) GELU.
#[derive(Debug)]
struct FeedForward {
    linear1: nn::Linear,
    linear2: nn::Linear,
    dropout: f64,
}

impl FeedForward {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = x.apply(&self.linear1);
        let parts = h.chunk(2, -1);
        let h = (&parts[0] * parts[1].gelu("none")).dropout(self.dropout, train);
        h.apply(&self.linear2).dropout(self.dropout, train)
    }
}

/// `DiffusionUNetTransformerBlock` (old: `BasicTransformerBlock`): pre-norm self-attention,
/// cross-attention and feed-forward, each with a residual.
#[derive(Debug)]
struct TransformerBlock {
    attn1: SABlock,
    ff: FeedForward,
    attn2: CrossAttentionBlock,
    norm1: nn::LayerNorm,
    norm2: nn::LayerNorm,
    norm3: nn::LayerNorm,
}

impl TransformerBlock {
    fn forward_t(&self, x: &Tensor, context: Option<&Tensor>, train: bool) -> Tensor {
        let x = self.attn1.forward_t(&x.apply(&self.norm1), train) + x;
        let x = self.attn2.forward_t(&x.apply(&self.norm2), context, train) + x;
        self.ff.forward_t(&x.apply(&self.norm3), train) + x
    }
}

/// `SpatialTransformer`: GroupNorm, 1x1 conv in, transformer blocks over the row-major
/// positions, 1x1 conv out, residual.
#[derive(Debug)]
struct SpatialTransformer {
    norm: nn::GroupNorm,
    proj_in: Convolution,
    transformer_blocks: Vec<TransformerBlock>,
    proj_out: Convolution,
}

impl SpatialTransformer {
    fn new(p: &nn::Path, c: i64, num_head_channels: i64, spec: &EncoderSpec, generation: Generation) -> Self {
        let heads = c / num_head_channels;
        let inner = heads * num_head_channels;
        let ctx = spec.cross_attention_dim.unwrap_or(inner);
        let opts = AttentionOptions {
            math: AttentionMath::for_library(generation, spec.use_flash_attention),
            upcast: spec.upcast_attention,
            dropout: spec.dropout_cattn,
        };
        // monai-generative's self-attention always has its output layer (`to_out.0`).
        let include_fc = spec.include_fc || generation == Generation::Generative;
        let blocks = (0..spec.transformer_num_layers)
            .map(|i| {
                let b = p / "transformer_blocks" / i;
                let ln = |n: &str| nn::layer_norm(&b / n, vec![inner], Default::default());
                let sa = SABlockConfig {
                    hidden_input_size: inner,
                    num_heads: heads,
                    dim_head: num_head_channels,
                    qkv_bias: false,
                    include_fc,
                    use_combined_linear: spec.use_combined_linear,
                };
                let lin = |n: &str, i, o| linear(&b / "ff" / n, i, o, true);
                TransformerBlock {
                    attn1: SABlock::new(&(&b / "attn1"), sa, opts),
                    ff: FeedForward {
                        linear1: lin("linear1", inner, 8 * inner),
                        linear2: lin("linear2", 4 * inner, inner),
                        dropout: spec.dropout_cattn,
                    },
                    attn2: CrossAttentionBlock::new(&(&b / "attn2"), inner, ctx, heads, num_head_channels, opts),
                    norm1: ln("norm1"),
                    norm2: ln("norm2"),
                    norm3: ln("norm3"),
                }
            })
            .collect();
        Self {
            norm: group_norm(&(p / "norm"), spec.norm_num_groups, c, spec.norm_eps),
            proj_in: Convolution::new(&(p / "proj_in"), ConvSpec::new(spec.spatial_dims, c, inner, 1, 1, 0)),
            transformer_blocks: blocks,
            proj_out: Convolution::zeroed(&(p / "proj_out"), ConvSpec::new(spec.spatial_dims, inner, c, 1, 1, 0)),
        }
    }

    fn forward_t(&self, x: &Tensor, context: Option<&Tensor>, train: bool) -> Tensor {
        // Channels last, positions flattened row-major: "b c h w (d) -> b (h w (d)) c" and back.
        let t = x.apply(&self.norm).apply(&self.proj_in);
        let size = t.size();
        let (b, inner, n) = (size[0], size[1], size.len() as i64);
        let to_last: Vec<i64> = std::iter::once(0).chain(2..n).chain(std::iter::once(1)).collect();
        let mut t = t.permute(to_last.as_slice()).reshape([b, -1, inner]);
        for block in &self.transformer_blocks {
            t = block.forward_t(&t, context, train);
        }
        let mut last_shape: Vec<i64> = vec![b];
        last_shape.extend_from_slice(&size[2..]);
        last_shape.push(inner);
        let to_first: Vec<i64> = [0, n - 1].into_iter().chain(1..n - 1).collect();
        let t = t.reshape(last_shape.as_slice()).permute(to_first.as_slice()).contiguous();
        t.apply(&self.proj_out) + x
    }
}

/// The attention after each ResnetBlock of a level: none, spatial self-attention
/// (unconditioned models) or a SpatialTransformer (`with_conditioning`).
// One per block, held once per model: variant size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Attention {
    /// `contiguous`: MONAI's blocks call `.contiguous()` on the attention output
    /// (a strided view). Values are the same, but the next conv then takes the standard-layout
    /// kernel; monai-generative keeps the view. Matching each keeps the sums bit-identical.
    Spatial {
        block: SpatialAttentionBlock,
        contiguous: bool,
    },
    Transformer(SpatialTransformer),
}

impl Attention {
    fn new(p: &nn::Path, c: i64, num_head_channels: i64, spec: &EncoderSpec, generation: Generation) -> Self {
        if spec.with_conditioning {
            Attention::Transformer(SpatialTransformer::new(p, c, num_head_channels, spec, generation))
        } else {
            let opts = AttentionOptions {
                math: AttentionMath::for_library(generation, spec.use_flash_attention),
                upcast: false,
                dropout: 0.0,
            };
            let block = SpatialAttentionBlock::new(
                p,
                c,
                c / num_head_channels,
                spec.norm_num_groups,
                spec.norm_eps,
                spec.include_fc,
                spec.use_combined_linear,
                opts,
            );
            Attention::Spatial { block, contiguous: generation == Generation::Monai }
        }
    }

    fn forward_t(&self, x: &Tensor, context: Option<&Tensor>, train: bool) -> Tensor {
        match self {
            Attention::Spatial { block, contiguous: true } => block.forward_t(x, train).contiguous(),
            Attention::Spatial { block, contiguous: false } => block.forward_t(x, train),
            Attention::Transformer(t) => t.forward_t(x, context, train),
        }
    }
}

// One per level, held once per model: variant size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Downsampler {
    /// `DiffusionUnetDownsample(use_conv=True)`: 3x3 stride-2 conv, symmetric padding 1 (the
    /// autoencoder pads asymmetrically instead), key `op.conv.*`.
    Conv(Convolution),
    Res(ResnetBlock),
}

/// `DownBlock` / `AttnDownBlock` / `CrossAttnDownBlock`.
#[derive(Debug)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Attention>,
    downsampler: Option<Downsampler>,
}

impl DownBlock {
    pub fn new(p: &nn::Path, l: &Level, spec: &EncoderSpec, generation: Generation) -> Self {
        let temb = spec.time_embed_dim();
        let resnets = (0..l.num_res_blocks)
            .map(|r| {
                let cin = if r == 0 { l.in_c } else { l.out_c };
                ResnetBlock::new(&(p / "resnets" / r), cin, l.out_c, temb, spec, Resample::None)
            })
            .collect();
        let attentions = if l.attention {
            (0..l.num_res_blocks)
                .map(|r| Attention::new(&(p / "attentions" / r), l.out_c, l.num_head_channels, spec, generation))
                .collect()
        } else {
            Vec::new()
        };
        let downsampler = l.resample.then(|| {
            let dp = p / "downsampler";
            if spec.resblock_updown {
                Downsampler::Res(ResnetBlock::new(&dp, l.out_c, l.out_c, temb, spec, Resample::Down))
            } else {
                Downsampler::Conv(Convolution::new(
                    &(&dp / "op"),
                    ConvSpec::new(spec.spatial_dims, l.out_c, l.out_c, 3, 2, 1),
                ))
            }
        });
        Self { resnets, attentions, downsampler }
    }

    /// Returns the block output and the tensors it adds to the skip list.
    pub fn forward_t(&self, x: &Tensor, emb: &Tensor, context: Option<&Tensor>, train: bool) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut out = Vec::new();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, emb);
            if let Some(a) = self.attentions.get(i) {
                h = a.forward_t(&h, context, train);
            }
            out.push(h.shallow_clone());
        }
        match &self.downsampler {
            Some(Downsampler::Conv(c)) => h = h.apply(c),
            Some(Downsampler::Res(r)) => h = r.forward(&h, emb),
            None => return (h, out),
        }
        out.push(h.shallow_clone());
        (h, out)
    }
}

/// `AttnMidBlock` / `CrossAttnMidBlock`: the middle block always has attention.
#[derive(Debug)]
pub(crate) struct MidBlock {
    resnet_1: ResnetBlock,
    attention: Attention,
    resnet_2: ResnetBlock,
}

impl MidBlock {
    pub fn new(p: &nn::Path, c: i64, num_head_channels: i64, spec: &EncoderSpec, generation: Generation) -> Self {
        let temb = spec.time_embed_dim();
        Self {
            resnet_1: ResnetBlock::new(&(p / "resnet_1"), c, c, temb, spec, Resample::None),
            attention: Attention::new(&(p / "attention"), c, num_head_channels, spec, generation),
            resnet_2: ResnetBlock::new(&(p / "resnet_2"), c, c, temb, spec, Resample::None),
        }
    }

    pub fn forward_t(&self, x: &Tensor, emb: &Tensor, context: Option<&Tensor>, train: bool) -> Tensor {
        let h = self.resnet_1.forward(x, emb);
        let h = self.attention.forward_t(&h, context, train);
        self.resnet_2.forward(&h, emb)
    }
}

// One per level, held once per model: variant size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Upsampler {
    /// Nearest x2, then a 3x3 conv: key `postconv.conv.*` (monai-generative: `conv.conv.*`).
    Nearest(Convolution),
    Res(ResnetBlock),
}

/// `UpBlock` / `AttnUpBlock` / `CrossAttnUpBlock`: `num_res_blocks + 1` ResnetBlocks, each
/// fed `cat([h, skip])` (current features first).
#[derive(Debug)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Attention>,
    upsampler: Option<Upsampler>,
}

impl UpBlock {
    /// `prev_c`: the width of the previous up block's output (the first ResnetBlock's input).
    pub fn new(p: &nn::Path, prev_c: i64, l: &Level, spec: &EncoderSpec, generation: Generation) -> Self {
        let (n, out_c, temb) = (l.num_res_blocks, l.out_c, spec.time_embed_dim());
        let resnets = (0..n)
            .map(|r| {
                let skip_c = if r == n - 1 { l.in_c } else { out_c };
                let res_in = if r == 0 { prev_c } else { out_c };
                ResnetBlock::new(&(p / "resnets" / r), res_in + skip_c, out_c, temb, spec, Resample::None)
            })
            .collect();
        let attentions = if l.attention {
            (0..n)
                .map(|r| Attention::new(&(p / "attentions" / r), out_c, l.num_head_channels, spec, generation))
                .collect()
        } else {
            Vec::new()
        };
        let upsampler = l.resample.then(|| {
            let up = p / "upsampler";
            if spec.resblock_updown {
                Upsampler::Res(ResnetBlock::new(&up, out_c, out_c, temb, spec, Resample::Up))
            } else {
                Upsampler::Nearest(Convolution::new(
                    &(&up / "postconv"),
                    ConvSpec::new(spec.spatial_dims, out_c, out_c, 3, 1, 1),
                ))
            }
        });
        Self { resnets, attentions, upsampler }
    }

    pub fn forward_t(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        emb: &Tensor,
        context: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the skip list has one tensor per up-path ResnetBlock");
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1), emb);
            if let Some(a) = self.attentions.get(i) {
                h = a.forward_t(&h, context, train);
            }
        }
        match &self.upsampler {
            Some(Upsampler::Nearest(c)) => upsample_nearest_x2(&h).apply(c),
            Some(Upsampler::Res(r)) => r.forward(&h, emb),
            None => h,
        }
    }
}
