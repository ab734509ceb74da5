//! Layers shared by the MONAI generative networks, named as their PyTorch modules are so that
//! a state-dict key maps to exactly one VarStore path.
use crate::checkpoint::Generation;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// An `int` repeated per level, or one value per level (MONAI accepts both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerLevel {
    Same(i64),
    Each(Vec<i64>),
}

impl PerLevel {
    pub fn expand(&self, levels: usize) -> Vec<i64> {
        match self {
            PerLevel::Same(n) => vec![*n; levels],
            PerLevel::Each(v) => v.clone(),
        }
    }
}

/// `nn.Conv{2,3}d` or `nn.ConvTranspose{2,3}d` with a square kernel, stride and padding: MONAI's networks are
/// dimension-generic (`spatial_dims`), so the number of spatial dimensions is a run-time value here. tch's
/// `nn::Conv<[i64; N]>` fixes it at compile time, hence this small layer of its own (keys `weight`, `bias`).
#[derive(Debug)]
pub struct ConvNd {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    dims: usize,
    stride: i64,
    padding: i64,
    /// Transposed convolutions only.
    output_padding: Option<i64>,
}

/// How a `ConvNd`'s weights start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConvInit {
    /// PyTorch's `reset_parameters`.
    Torch,
    /// `zero_module(...)`: weights and bias zero.
    Zero,
}

/// Sizes of a `ConvNd`.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub spatial_dims: i64,
    pub cin: i64,
    pub cout: i64,
    pub kernel: i64,
    pub stride: i64,
    pub padding: i64,
}

impl ConvSpec {
    pub fn new(spatial_dims: i64, cin: i64, cout: i64, kernel: i64, stride: i64, padding: i64) -> Self {
        Self { spatial_dims, cin, cout, kernel, stride, padding }
    }
}

impl ConvNd {
    /// `nn.ConvNd(cin, cout, kernel, stride, padding)`.
    pub fn new(p: &nn::Path, s: ConvSpec, init: ConvInit) -> Self {
        let dims = s.spatial_dims as usize;
        let mut shape = vec![s.cout, s.cin];
        shape.extend(std::iter::repeat_n(s.kernel, dims));
        let fan_in = s.cin * s.kernel.pow(dims as u32);
        let init = match init {
            ConvInit::Torch => torch_default_init(fan_in),
            ConvInit::Zero => nn::Init::Const(0.0),
        };
        // Bias first, as tch's `nn::conv`: a from-scratch network draws its initial weights in this order.
        let bs = Some(p.var("bias", &[s.cout], init));
        let ws = p.var("weight", &shape, init);
        Self { ws, bs, dims, stride: s.stride, padding: s.padding, output_padding: None }
    }

    /// `nn.ConvTransposeNd(cin, cout, kernel, stride, padding, output_padding)`: the weight is (cin, cout, k, ...),
    /// and PyTorch takes its fan-in from dimension 1.
    pub fn transposed(p: &nn::Path, s: ConvSpec, output_padding: i64) -> Self {
        let dims = s.spatial_dims as usize;
        let mut shape = vec![s.cin, s.cout];
        shape.extend(std::iter::repeat_n(s.kernel, dims));
        let init = torch_default_init(s.cout * s.kernel.pow(dims as u32));
        // Bias first, as tch's `nn::conv`: a from-scratch network draws its initial weights in this order.
        let bs = Some(p.var("bias", &[s.cout], init));
        let ws = p.var("weight", &shape, init);
        Self { ws, bs, dims, stride: s.stride, padding: s.padding, output_padding: Some(output_padding) }
    }
}

impl Module for ConvNd {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let d = self.dims;
        let (st, pa, di) = (vec![self.stride; d], vec![self.padding; d], vec![1i64; d]);
        // The same ATen entry points as torch.nn's `F.conv2d`/`F.conv3d` (and transposed), so results are bit
        // for bit PyTorch's.
        match (d, self.output_padding) {
            (2, None) => xs.conv2d(&self.ws, self.bs.as_ref(), st, pa, di, 1),
            (3, None) => xs.conv3d(&self.ws, self.bs.as_ref(), st, pa, di, 1),
            (2, Some(op)) => xs.conv_transpose2d(&self.ws, self.bs.as_ref(), st, pa, [op, op], 1, di),
            (3, Some(op)) => xs.conv_transpose3d(&self.ws, self.bs.as_ref(), st, pa, [op, op, op], 1, di),
            (1, None) => xs.conv1d(&self.ws, self.bs.as_ref(), st, pa, di, 1),
            (1, Some(op)) => xs.conv_transpose1d(&self.ws, self.bs.as_ref(), st, pa, [op], 1, di),
            _ => unreachable!("ConvNd of {d} spatial dimensions: configs are validated to 1-3"),
        }
    }
}

/// `monai.networks.blocks.Convolution(conv_only=True)`: an `nn.Sequential` whose one child is
/// named `conv`, hence the extra `.conv` in every key (`P.conv.weight`).
#[derive(Debug)]
pub struct Convolution {
    conv: ConvNd,
}

/// PyTorch's `reset_parameters` for convs and linears: weight `kaiming_uniform_(a=sqrt(5))` and
/// bias, both U(-1/sqrt(fan_in), 1/sqrt(fan_in)). tch's defaults differ (weights sqrt(6) times
/// wider, conv biases zero), which changes how a network trained from scratch behaves.
pub fn torch_default_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

/// `nn.Linear` initialised as PyTorch does.
pub fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    let init = torch_default_init(i);
    nn::linear(p, i, o, nn::LinearConfig { ws_init: init, bs_init: bias.then_some(init), bias })
}

impl Convolution {
    pub fn new(p: &nn::Path, s: ConvSpec) -> Self {
        Self { conv: ConvNd::new(&(p / "conv"), s, ConvInit::Torch) }
    }

    /// MONAI's `zero_module(Convolution(...))`: weights and bias start at zero, so a
    /// residual branch or a ControlNet output starts as a no-op.
    pub fn zeroed(p: &nn::Path, s: ConvSpec) -> Self {
        Self { conv: ConvNd::new(&(p / "conv"), s, ConvInit::Zero) }
    }
}

impl Module for Convolution {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.conv)
    }
}

/// `Convolution(conv_only=True, is_transposed=True)`: a transposed conv under `.conv`, with
/// MONAI's `output_padding = stride - 1`.
#[derive(Debug)]
pub struct TransposedConvolution {
    conv: ConvNd,
}

impl TransposedConvolution {
    pub fn new(p: &nn::Path, s: ConvSpec) -> Self {
        Self { conv: ConvNd::transposed(&(p / "conv"), s, s.stride - 1) }
    }
}

impl Module for TransposedConvolution {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.conv)
    }
}

/// Nearest-neighbour upsampling by 2 in every spatial dimension (`F.interpolate(scale_factor=2.0,
/// mode="nearest")`, which passes the scale on to ATen).
pub fn upsample_nearest_x2(x: &Tensor) -> Tensor {
    let s = x.size();
    match s.len() {
        4 => x.upsample_nearest2d([2 * s[2], 2 * s[3]], 2.0, 2.0),
        5 => x.upsample_nearest3d([2 * s[2], 2 * s[3], 2 * s[4]], 2.0, 2.0, 2.0),
        3 => x.upsample_nearest1d([2 * s[2]], 2.0),
        n => unreachable!("upsampling a {n}-D tensor: configs are validated to 1-3 spatial dimensions"),
    }
}

/// `AvgPool{2,3}d(kernel_size=2, stride=2)`.
pub fn avg_pool_x2(x: &Tensor) -> Tensor {
    match x.dim() {
        4 => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>),
        5 => x.avg_pool3d([2, 2, 2], [2, 2, 2], [0, 0, 0], false, true, None::<i64>),
        3 => x.avg_pool1d([2], [2], [0], false, true),
        n => unreachable!("pooling a {n}-D tensor: configs are validated to 1-3 spatial dimensions"),
    }
}

/// `nn.GroupNorm(num_groups, channels, eps, affine=True)`.
pub fn group_norm(p: &nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(p, groups, channels, nn::GroupNormConfig { eps, ..Default::default() })
}

/// How attention scores are computed. The results agree to float32 rounding; each library's
/// own formula makes medgen bit-exact with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMath {
    /// MONAI >= 1.4: `einsum(q, k) * scale`, softmax, `einsum(p, v)`.
    Einsum,
    /// monai-generative 0.2: `baddbmm(beta=0, alpha=scale)`, softmax, `bmm`.
    Baddbmm,
    /// `use_flash_attention=True` in MONAI >= 1.4: `scaled_dot_product_attention`.
    Sdpa,
}

impl AttentionMath {
    /// The formula of a library. monai-generative's flash option is xformers, numerically the
    /// same attention as its `baddbmm` path.
    pub fn for_library(generation: Generation, use_flash_attention: bool) -> Self {
        match (generation, use_flash_attention) {
            (Generation::Generative, _) => AttentionMath::Baddbmm,
            (Generation::Monai, true) => AttentionMath::Sdpa,
            (Generation::Monai, false) => AttentionMath::Einsum,
        }
    }

    /// `1/sqrt(d)` as each library writes it (`1 / math.sqrt(d)` vs `d ** -0.5`), so the
    /// scale is the same float down to the last bit.
    pub fn scale(self, dim_head: i64) -> f64 {
        match self {
            AttentionMath::Baddbmm => 1.0 / (dim_head as f64).sqrt(),
            AttentionMath::Einsum | AttentionMath::Sdpa => (dim_head as f64).powf(-0.5),
        }
    }
}

/// What every attention layer shares: the formula, the upcast and the dropout.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions {
    pub math: AttentionMath,
    /// `upcast_attention`: queries and keys (hence scores and softmax) in float32.
    pub upcast: bool,
    /// Dropout on the attention weights and the output (training only).
    pub dropout: f64,
}

impl AttentionOptions {
    pub fn new(math: AttentionMath) -> Self {
        Self { math, upcast: false, dropout: 0.0 }
    }
}

/// Scaled dot-product attention over `(batch, heads, tokens, dim_head)` tensors.
fn attend(q: Tensor, k: Tensor, v: &Tensor, opts: &AttentionOptions, train: bool) -> Tensor {
    let (b, h, nq, d) = q.size4().expect("attention query is (batch, heads, tokens, dim)");
    let nk = k.size()[2];
    let scale = opts.math.scale(d);
    let value_kind = v.kind();
    let (q, k) = if opts.upcast { (q.to_kind(Kind::Float), k.to_kind(Kind::Float)) } else { (q, k) };
    // MONAI's flash path passes `dropout_p` even in eval mode (a MONAI bug): medgen drops only
    // in training, as its other paths do.
    let p_drop = if train { opts.dropout } else { 0.0 };
    match opts.math {
        AttentionMath::Sdpa => {
            let v = if opts.upcast { v.to_kind(Kind::Float) } else { v.shallow_clone() };
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, p_drop, false, scale, false)
                .to_kind(value_kind)
        }
        AttentionMath::Einsum => {
            let att = q.matmul(&k.transpose(-1, -2)) * scale;
            let att = att.softmax(-1, None).to_kind(value_kind).dropout(p_drop, train);
            att.matmul(v)
        }
        AttentionMath::Baddbmm => {
            let q = q.reshape([b * h, nq, d]);
            let k = k.reshape([b * h, nk, d]);
            let zeros = Tensor::zeros([b * h, nq, nk], (q.kind(), q.device()));
            let att = zeros.baddbmm(&q, &k.transpose(-1, -2), 0.0, scale);
            // monai-generative drops only at the output projection, never the weights.
            let att = att.softmax(-1, None).to_kind(value_kind);
            att.bmm(&v.reshape([b * h, nk, d])).view([b, h, nq, d])
        }
    }
}

/// "b n (l d) -> b l n d": the head index is the outer factor of the channels.
fn split_heads(t: Tensor, heads: i64) -> Tensor {
    let (b, n, c) = t.size3().expect("attention input is (batch, tokens, channels)");
    t.view([b, n, heads, c / heads]).permute([0, 2, 1, 3])
}

/// "b l n d -> b n (l d)"
fn merge_heads(t: Tensor) -> Tensor {
    let (b, h, n, d) = t.size4().expect("attention output is (batch, heads, tokens, dim)");
    t.permute([0, 2, 1, 3]).reshape([b, n, h * d])
}

/// Sizes of a `SABlock`, named as its constructor arguments.
#[derive(Debug, Clone, Copy)]
pub struct SABlockConfig {
    /// Width of the input and of the output projection (`hidden_input_size`).
    pub hidden_input_size: i64,
    pub num_heads: i64,
    pub dim_head: i64,
    pub qkv_bias: bool,
    pub include_fc: bool,
    pub use_combined_linear: bool,
}

/// `monai.networks.blocks.SABlock` (self-attention over a token sequence), no causal mask.
#[derive(Debug)]
pub struct SABlock {
    to_q: Option<nn::Linear>,
    to_k: Option<nn::Linear>,
    to_v: Option<nn::Linear>,
    qkv: Option<nn::Linear>,
    out_proj: Option<nn::Linear>,
    num_heads: i64,
    opts: AttentionOptions,
}

fn named_linear(p: &nn::Path, name: &str, i: i64, o: i64, bias: bool) -> nn::Linear {
    linear(p / name, i, o, bias)
}

impl SABlock {
    pub fn new(p: &nn::Path, cfg: SABlockConfig, opts: AttentionOptions) -> Self {
        let (c, inner) = (cfg.hidden_input_size, cfg.num_heads * cfg.dim_head);
        let (to_q, to_k, to_v, qkv) = if cfg.use_combined_linear {
            (None, None, None, Some(named_linear(p, "qkv", c, 3 * inner, cfg.qkv_bias)))
        } else {
            (
                Some(named_linear(p, "to_q", c, inner, cfg.qkv_bias)),
                Some(named_linear(p, "to_k", c, inner, cfg.qkv_bias)),
                Some(named_linear(p, "to_v", c, inner, cfg.qkv_bias)),
                None,
            )
        };
        let out_proj = cfg.include_fc.then(|| named_linear(p, "out_proj", inner, c, true));
        Self { to_q, to_k, to_v, qkv, out_proj, num_heads: cfg.num_heads, opts }
    }

    /// `x`: (batch, tokens, channels).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let h = self.num_heads;
        let (q, k, v) = match &self.qkv {
            Some(qkv) => {
                let (b, n, _) = x.size3().expect("SABlock input is (batch, tokens, channels)");
                // "b n (qkv l d) -> qkv b l n d"
                let t = x.apply(qkv).view([b, n, 3, h, -1]).permute([2, 0, 3, 1, 4]);
                (t.get(0), t.get(1), t.get(2))
            }
            None => (
                split_heads(x.apply(self.to_q.as_ref().unwrap()), h),
                split_heads(x.apply(self.to_k.as_ref().unwrap()), h),
                split_heads(x.apply(self.to_v.as_ref().unwrap()), h),
            ),
        };
        let out = merge_heads(attend(q, k, &v, &self.opts, train));
        match &self.out_proj {
            Some(o) => out.apply(o).dropout(self.opts.dropout, train),
            None => out.dropout(self.opts.dropout, train),
        }
    }
}

/// `monai.networks.blocks.CrossAttentionBlock`: queries from `x`, keys and values from the
/// context (from `x` when there is none); the output projection is always there.
#[derive(Debug)]
pub struct CrossAttentionBlock {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    out_proj: nn::Linear,
    num_heads: i64,
    opts: AttentionOptions,
}

impl CrossAttentionBlock {
    pub fn new(
        p: &nn::Path,
        hidden_input_size: i64,
        context_input_size: i64,
        num_heads: i64,
        dim_head: i64,
        opts: AttentionOptions,
    ) -> Self {
        let inner = num_heads * dim_head;
        Self {
            to_q: named_linear(p, "to_q", hidden_input_size, inner, false),
            to_k: named_linear(p, "to_k", context_input_size, inner, false),
            to_v: named_linear(p, "to_v", context_input_size, inner, false),
            out_proj: named_linear(p, "out_proj", inner, hidden_input_size, true),
            num_heads,
            opts,
        }
    }

    pub fn forward_t(&self, x: &Tensor, context: Option<&Tensor>, train: bool) -> Tensor {
        let kv = context.unwrap_or(x);
        let q = split_heads(x.apply(&self.to_q), self.num_heads);
        let k = split_heads(kv.apply(&self.to_k), self.num_heads);
        let v = split_heads(kv.apply(&self.to_v), self.num_heads);
        merge_heads(attend(q, k, &v, &self.opts, train)).apply(&self.out_proj).dropout(self.opts.dropout, train)
    }
}

/// `monai.networks.blocks.SpatialAttentionBlock`: GroupNorm, attention over the flattened
/// spatial positions (row-major), residual. `qkv_bias=True`, heads of `channels / num_heads`.
#[derive(Debug)]
pub struct SpatialAttentionBlock {
    norm: nn::GroupNorm,
    attn: SABlock,
}

impl SpatialAttentionBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &nn::Path,
        channels: i64,
        num_heads: i64,
        groups: i64,
        eps: f64,
        include_fc: bool,
        use_combined_linear: bool,
        opts: AttentionOptions,
    ) -> Self {
        let cfg = SABlockConfig {
            hidden_input_size: channels,
            num_heads,
            dim_head: channels / num_heads,
            qkv_bias: true,
            include_fc,
            use_combined_linear,
        };
        Self { norm: group_norm(&(p / "norm"), groups, channels, eps), attn: SABlock::new(&(p / "attn"), cfg, opts) }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let shape = x.size();
        let (b, c) = (shape[0], shape[1]);
        let h = x.apply(&self.norm).reshape([b, c, -1]).transpose(1, 2);
        let h = self.attn.forward_t(&h, train).transpose(1, 2).reshape(shape.as_slice());
        h + x
    }
}

impl Module for SpatialAttentionBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }
}
