//! AutoencoderKL (2D and 3D), after MONAI 1.6.1 `monai/networks/nets/autoencoderkl.py` and
//! monai-generative 0.2.3 `generative/networks/nets/autoencoderkl.py` (same architecture,
//! two naming generations; see `checkpoint::naming`).
//!
//! Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022);
//! Pinaya et al., "Brain Imaging Generation with Latent Diffusion Models" (2022).
//!
//! Unlike the original LDM VAE: the encoder outputs `latent_channels` (mean and log-variance
//! come from two 1x1 convs), there is no SiLU between the last GroupNorm and `conv_out`, and
//! each decoder level has `num_res_blocks` (not `+1`) ResBlocks.
use super::blocks::{
    group_norm, upsample_nearest_x2, AttentionMath, AttentionOptions, ConvNd, ConvSpec, Convolution,
    SpatialAttentionBlock, TransposedConvolution,
};
use crate::checkpoint::Generation;
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::Tensor;

use super::blocks::PerLevel;

/// Constructor arguments of MONAI's `AutoencoderKL`, with its defaults. The monai-generative
/// 0.2 names (`num_channels`, `use_checkpointing`) are accepted as aliases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderKLConfig {
    pub spatial_dims: i64,
    pub in_channels: i64,
    pub out_channels: i64,
    pub num_res_blocks: PerLevel,
    #[serde(alias = "num_channels")]
    pub channels: Vec<i64>,
    pub attention_levels: Vec<bool>,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub with_encoder_nonlocal_attn: bool,
    pub with_decoder_nonlocal_attn: bool,
    /// Activation checkpointing saves memory in training; it has no effect on results, and
    /// medgen does not implement it (the flag is accepted so MONAI configs load unchanged).
    #[serde(alias = "use_checkpointing")]
    pub use_checkpoint: bool,
    pub use_convtranspose: bool,
    pub include_fc: bool,
    pub use_combined_linear: bool,
    pub use_flash_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            spatial_dims: 2,
            in_channels: 1,
            out_channels: 1,
            num_res_blocks: PerLevel::Each(vec![2, 2, 2, 2]),
            channels: vec![32, 64, 64, 64],
            attention_levels: vec![false, false, true, true],
            latent_channels: 3,
            norm_num_groups: 32,
            norm_eps: 1e-6,
            with_encoder_nonlocal_attn: true,
            with_decoder_nonlocal_attn: true,
            use_checkpoint: false,
            use_convtranspose: false,
            include_fc: true,
            use_combined_linear: false,
            use_flash_attention: false,
        }
    }
}

impl AutoencoderKLConfig {
    /// The latent `[latent_channels, spatial...]` of an image of `spatial` size: every axis halved at each level
    /// but the last.
    pub fn latent_shape(&self, spatial: &[i64]) -> Vec<i64> {
        let f = 1i64 << (self.channels.len() - 1);
        std::iter::once(self.latent_channels).chain(spatial.iter().map(|s| s / f)).collect()
    }

    /// The checks MONAI's constructor makes, plus what this port supports.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            matches!(self.spatial_dims, 2 | 3),
            "AutoencoderKL: spatial_dims must be 2 or 3, got {}",
            self.spatial_dims
        );
        ensure!(!self.channels.is_empty(), "AutoencoderKL: channels must not be empty");
        ensure!(self.norm_num_groups > 0, "AutoencoderKL: norm_num_groups must be positive");
        ensure!(
            self.channels.iter().all(|&c| c > 0),
            "AutoencoderKL: channels must be positive, got {:?}",
            self.channels
        );
        if let Some(c) = self.channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            bail!(
                "AutoencoderKL expects all channels being multiple of norm_num_groups: {c} is not a multiple of {}",
                self.norm_num_groups
            );
        }
        ensure!(
            self.channels.len() == self.attention_levels.len(),
            "AutoencoderKL expects channels ({}) and attention_levels ({}) of the same length",
            self.channels.len(),
            self.attention_levels.len()
        );
        let nrb = self.num_res_blocks.expand(self.channels.len());
        ensure!(
            nrb.len() == self.channels.len(),
            "num_res_blocks should be a single integer or a list with one entry per level ({}), got {:?}",
            self.channels.len(),
            nrb
        );
        ensure!(nrb.iter().all(|&n| n >= 0), "AutoencoderKL: num_res_blocks must not be negative: {nrb:?}");
        // A level without ResBlocks passes its input through unchanged: in the encoder at the previous level's
        // width, in the decoder (levels reversed) at the next level's. Both must then equal the level's own width
        // (MONAI fails in the forward pass otherwise).
        for (i, w) in self.channels.windows(2).enumerate() {
            for (level, side) in [(i + 1, i), (i, i + 1)] {
                ensure!(
                    nrb[level] > 0 || w[0] == w[1],
                    "AutoencoderKL: num_res_blocks[{level}] = 0 needs channels[{level}] == channels[{side}], got {:?}",
                    self.channels
                );
            }
        }
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ] {
            ensure!(v > 0, "AutoencoderKL: {name} must be positive, got {v}");
        }
        Ok(())
    }
}

#[derive(Debug)]
struct AEKLResBlock {
    norm1: nn::GroupNorm,
    conv1: Convolution,
    norm2: nn::GroupNorm,
    conv2: Convolution,
    nin_shortcut: Option<Convolution>,
}

impl AEKLResBlock {
    fn new(p: &nn::Path, d: i64, cin: i64, cout: i64, groups: i64, eps: f64) -> Self {
        Self {
            norm1: group_norm(&(p / "norm1"), groups, cin, eps),
            conv1: Convolution::new(&(p / "conv1"), ConvSpec::new(d, cin, cout, 3, 1, 1)),
            norm2: group_norm(&(p / "norm2"), groups, cout, eps),
            conv2: Convolution::new(&(p / "conv2"), ConvSpec::new(d, cout, cout, 3, 1, 1)),
            nin_shortcut: (cin != cout)
                .then(|| Convolution::new(&(p / "nin_shortcut"), ConvSpec::new(d, cin, cout, 1, 1, 0))),
        }
    }
}

impl Module for AEKLResBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.norm1).silu().apply(&self.conv1);
        let h = h.apply(&self.norm2).silu().apply(&self.conv2);
        match &self.nin_shortcut {
            Some(s) => x.apply(s) + h,
            None => x + h,
        }
    }
}

/// Pads each spatial dimension by one at its end, then a stride-2 conv with no padding.
#[derive(Debug)]
struct AEKLDownsample {
    conv: Convolution,
    /// `(0, 1)` per spatial dimension.
    pad: Vec<i64>,
}

impl Module for AEKLDownsample {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.constant_pad_nd(self.pad.as_slice()).apply(&self.conv)
    }
}

#[derive(Debug)]
enum Upsample {
    /// Nearest 2x, then a 3x3 conv: MONAI `UpSample(mode="nontrainable", post_conv=...)`,
    /// key `postconv.conv.*` (monai-generative: `conv.conv.*`, renamed on load).
    Nearest { postconv: Convolution },
    /// MONAI `UpSample(mode="deconv")`: ConvTranspose k2 s2, key `deconv.*`.
    Deconv { deconv: ConvNd },
    /// monai-generative `Upsample(use_convtranspose=True)`: ConvTranspose k3 s2 p1
    /// output_padding 1, key `conv.conv.*`. Its weights cannot become MONAI's k2 deconv.
    LegacyDeconv { conv: TransposedConvolution },
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Upsample::Nearest { postconv } => upsample_nearest_x2(x).apply(postconv),
            Upsample::Deconv { deconv } => x.apply(deconv),
            Upsample::LegacyDeconv { conv } => x.apply(conv),
        }
    }
}

// One per layer, held once per model: variant size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Block {
    Conv(Convolution),
    Res(AEKLResBlock),
    Attn(SpatialAttentionBlock),
    Down(AEKLDownsample),
    Up(Upsample),
    Norm(nn::GroupNorm),
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Block::Conv(m) => m.forward(x),
            Block::Res(m) => m.forward(x),
            Block::Attn(m) => m.forward(x),
            Block::Down(m) => m.forward(x),
            Block::Up(m) => m.forward(x),
            Block::Norm(m) => m.forward(x),
        }
    }
}

/// `nn.ModuleList` named `blocks`: entries are pushed in the Python order, the index being
/// the running length, so `blocks.N` matches the state dict.
struct BlockList<'a> {
    p: nn::Path<'a>,
    blocks: Vec<Block>,
}

impl<'a> BlockList<'a> {
    fn new(p: &nn::Path<'a>) -> Self {
        Self { p: p / "blocks", blocks: Vec::new() }
    }
    fn next(&self) -> nn::Path<'a> {
        &self.p / self.blocks.len()
    }
    fn push(&mut self, b: Block) {
        self.blocks.push(b);
    }
}

#[derive(Debug)]
pub struct Encoder {
    blocks: Vec<Block>,
}

#[derive(Debug)]
pub struct Decoder {
    blocks: Vec<Block>,
}

fn attention(p: &nn::Path, c: i64, cfg: &AutoencoderKLConfig, generation: Generation) -> Block {
    let opts = AttentionOptions::new(AttentionMath::for_library(generation, cfg.use_flash_attention));
    // The AE never passes num_head_channels: one head of width c.
    Block::Attn(SpatialAttentionBlock::new(
        p,
        c,
        1,
        cfg.norm_num_groups,
        cfg.norm_eps,
        cfg.include_fc,
        cfg.use_combined_linear,
        opts,
    ))
}

impl Encoder {
    fn new(p: &nn::Path, cfg: &AutoencoderKLConfig, generation: Generation) -> Self {
        let (d, g, eps) = (cfg.spatial_dims, cfg.norm_num_groups, cfg.norm_eps);
        let ch = &cfg.channels;
        let nrb = cfg.num_res_blocks.expand(ch.len());
        let mut b = BlockList::new(p);
        b.push(Block::Conv(Convolution::new(&b.next(), ConvSpec::new(d, cfg.in_channels, ch[0], 3, 1, 1))));
        let mut out_c = ch[0];
        for i in 0..ch.len() {
            let mut in_c = out_c;
            out_c = ch[i];
            for _ in 0..nrb[i] {
                b.push(Block::Res(AEKLResBlock::new(&b.next(), d, in_c, out_c, g, eps)));
                in_c = out_c;
                if cfg.attention_levels[i] {
                    b.push(attention(&b.next(), in_c, cfg, generation));
                }
            }
            if i != ch.len() - 1 {
                let conv = Convolution::new(&(b.next() / "conv"), ConvSpec::new(d, in_c, in_c, 3, 2, 0));
                b.push(Block::Down(AEKLDownsample { conv, pad: [0, 1].repeat(d as usize) }));
            }
        }
        let last = *ch.last().unwrap();
        if cfg.with_encoder_nonlocal_attn {
            b.push(Block::Res(AEKLResBlock::new(&b.next(), d, last, last, g, eps)));
            b.push(attention(&b.next(), last, cfg, generation));
            b.push(Block::Res(AEKLResBlock::new(&b.next(), d, last, last, g, eps)));
        }
        b.push(Block::Norm(group_norm(&b.next(), g, last, eps)));
        b.push(Block::Conv(Convolution::new(&b.next(), ConvSpec::new(d, last, cfg.latent_channels, 3, 1, 1))));
        Self { blocks: b.blocks }
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.blocks.iter().fold(x.shallow_clone(), |h, b| b.forward(&h))
    }
}

impl Decoder {
    fn new(p: &nn::Path, cfg: &AutoencoderKLConfig, generation: Generation) -> Self {
        let (d, g, eps) = (cfg.spatial_dims, cfg.norm_num_groups, cfg.norm_eps);
        let rev: Vec<i64> = cfg.channels.iter().rev().copied().collect();
        let rev_attn: Vec<bool> = cfg.attention_levels.iter().rev().copied().collect();
        let rev_nrb: Vec<i64> = cfg.num_res_blocks.expand(rev.len()).into_iter().rev().collect();
        let mut b = BlockList::new(p);
        b.push(Block::Conv(Convolution::new(&b.next(), ConvSpec::new(d, cfg.latent_channels, rev[0], 3, 1, 1))));
        if cfg.with_decoder_nonlocal_attn {
            b.push(Block::Res(AEKLResBlock::new(&b.next(), d, rev[0], rev[0], g, eps)));
            b.push(attention(&b.next(), rev[0], cfg, generation));
            b.push(Block::Res(AEKLResBlock::new(&b.next(), d, rev[0], rev[0], g, eps)));
        }
        let mut out_c = rev[0];
        for i in 0..rev.len() {
            let mut in_c = out_c;
            out_c = rev[i];
            for _ in 0..rev_nrb[i] {
                b.push(Block::Res(AEKLResBlock::new(&b.next(), d, in_c, out_c, g, eps)));
                in_c = out_c;
                if rev_attn[i] {
                    b.push(attention(&b.next(), in_c, cfg, generation));
                }
            }
            if i != rev.len() - 1 {
                let p = b.next();
                let up = match (cfg.use_convtranspose, generation) {
                    (false, _) => Upsample::Nearest {
                        postconv: Convolution::new(&(&p / "postconv"), ConvSpec::new(d, in_c, in_c, 3, 1, 1)),
                    },
                    (true, Generation::Monai) => Upsample::Deconv {
                        deconv: ConvNd::transposed(&(&p / "deconv"), ConvSpec::new(d, in_c, in_c, 2, 2, 0), 0),
                    },
                    (true, Generation::Generative) => Upsample::LegacyDeconv {
                        conv: TransposedConvolution::new(&(&p / "conv"), ConvSpec::new(d, in_c, in_c, 3, 2, 1)),
                    },
                };
                b.push(Block::Up(up));
            }
        }
        b.push(Block::Norm(group_norm(&b.next(), g, out_c, eps)));
        b.push(Block::Conv(Convolution::new(&b.next(), ConvSpec::new(d, out_c, cfg.out_channels, 3, 1, 1))));
        Self { blocks: b.blocks }
    }
}

impl Module for Decoder {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.blocks.iter().fold(x.shallow_clone(), |h, b| b.forward(&h))
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    quant_conv_mu: Convolution,
    quant_conv_log_sigma: Convolution,
    post_quant_conv: Convolution,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Builds the network under `p` (usually `vs.root()`). `generation` selects the layer
    /// that differs between the two libraries for `use_convtranspose`, and each library's
    /// attention formula (equal up to float rounding).
    pub fn new(p: &nn::Path, config: &AutoencoderKLConfig, generation: Generation) -> Result<Self> {
        config.validate()?;
        let one_by_one = ConvSpec::new(config.spatial_dims, config.latent_channels, config.latent_channels, 1, 1, 0);
        Ok(Self {
            encoder: Encoder::new(&(p / "encoder"), config, generation),
            decoder: Decoder::new(&(p / "decoder"), config, generation),
            quant_conv_mu: Convolution::new(&(p / "quant_conv_mu"), one_by_one),
            quant_conv_log_sigma: Convolution::new(&(p / "quant_conv_log_sigma"), one_by_one),
            post_quant_conv: Convolution::new(&(p / "post_quant_conv"), one_by_one),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    fn check_input(&self, x: &Tensor, channels: i64, what: &str) -> Result<()> {
        let s = x.size();
        let layout = match self.config.spatial_dims {
            2 => "(batch, channels, height, width)",
            _ => "(batch, channels, height, width, depth)",
        };
        ensure!(s.len() == 2 + self.config.spatial_dims as usize, "{what} must be {layout}, got shape {s:?}");
        ensure!(s[1] == channels, "{what} must have {channels} channels, got shape {s:?}");
        ensure!(s[2..].iter().all(|&n| n > 0), "{what} has an empty spatial size: {s:?}");
        ensure!(
            x.is_floating_point(),
            "{what} must be a floating-point tensor, got {:?} (AutoencoderKL weights are float)",
            x.kind()
        );
        Ok(())
    }

    /// The factor the encoder shrinks images by, `2^(levels - 1)`.
    pub fn downsampling(&self) -> i64 {
        1 << (self.config.channels.len() - 1)
    }

    /// Checks an image batch `(B, C, H, W[, D])` can be encoded and decoded back to its own size, as a
    /// reconstruction loss or metric needs: every spatial size a multiple of `2^(levels - 1)`. MONAI (and
    /// [`encode`](Self::encode)) take other sizes too, and then reconstruct a smaller image.
    pub fn check_reconstructable(&self, x: &Tensor, what: &str) -> Result<()> {
        self.check_input(x, self.config.in_channels, what)?;
        self.check_reconstructable_size(&x.size()[2..], what)
    }

    /// The size rule of [`check_reconstructable`](Self::check_reconstructable) for an image whose spatial
    /// size is `size` (`[h, w]` or `[h, w, d]`), not yet read into a tensor (a list of PNGs, a volume's crop).
    pub fn check_reconstructable_size(&self, size: &[i64], what: &str) -> Result<()> {
        let f = self.downsampling();
        let shown = size.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("x");
        let sides = if size.len() == 3 { "a height, width and depth" } else { "a height and width" };
        ensure!(
            size.iter().all(|&n| n % f == 0),
            "{what} is {shown}: this AutoencoderKL ({} levels) needs {sides} that are multiples of {f} \
             (2^(levels-1)) to reconstruct an image of the same size",
            self.config.channels.len()
        );
        Ok(())
    }

    /// Returns `(z_mu, z_sigma)`; the log-variance is clamped to [-30, 20] as in MONAI.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_input(x, self.config.in_channels, "encoder input")?;
        // Each stride-2 downsampling conv (3x3, padding 0 before and 1 after) needs 2 pixels.
        let (s, f) = (x.size(), self.downsampling());
        if s[2..].iter().any(|&n| n < f) {
            let shown = |v: &[i64]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("x");
            bail!(
                "encoder input is {}: this AutoencoderKL ({} levels) needs at least {} pixels",
                shown(&s[2..]),
                self.config.channels.len(),
                shown(&vec![f; s.len() - 2])
            );
        }
        let h = self.encoder.forward(x);
        let z_mu = h.apply(&self.quant_conv_mu);
        let z_log_var = h.apply(&self.quant_conv_log_sigma).clamp(-30.0, 20.0);
        let z_sigma = (z_log_var / 2.0).exp();
        Ok((z_mu, z_sigma))
    }

    /// `z_mu + eps * z_sigma` with `eps ~ N(0, 1)` from the global torch generator, drawn as
    /// `torch.randn_like(z_sigma)` is (same seed, same libtorch: same numbers).
    pub fn sampling(&self, z_mu: &Tensor, z_sigma: &Tensor) -> Tensor {
        let eps = z_sigma.randn_like();
        Self::sampling_with_noise(z_mu, z_sigma, &eps)
    }

    /// `sampling` with the noise given.
    pub fn sampling_with_noise(z_mu: &Tensor, z_sigma: &Tensor, eps: &Tensor) -> Tensor {
        z_mu + eps * z_sigma
    }

    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_input(z, self.config.latent_channels, "latent")?;
        Ok(self.decoder.forward(&z.apply(&self.post_quant_conv)))
    }

    /// Deterministic: decodes `z_mu`.
    pub fn reconstruct(&self, x: &Tensor) -> Result<Tensor> {
        let (z_mu, _) = self.encode(x)?;
        self.decode(&z_mu)
    }

    /// `(reconstruction, z_mu, z_sigma)`, the reconstruction decoded from a sampled latent.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (z_mu, z_sigma) = self.encode(x)?;
        let z = self.sampling(&z_mu, &z_sigma);
        Ok((self.decode(&z)?, z_mu, z_sigma))
    }

    /// A sampled (stochastic) latent, as MONAI's LDM training uses.
    pub fn encode_stage_2_inputs(&self, x: &Tensor) -> Result<Tensor> {
        let (z_mu, z_sigma) = self.encode(x)?;
        Ok(self.sampling(&z_mu, &z_sigma))
    }

    pub fn decode_stage_2_outputs(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(z)
    }
}
