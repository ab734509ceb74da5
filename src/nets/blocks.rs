//! Layers shared by the MONAI generative networks, named as their PyTorch modules are so that
//! a state-dict key maps to exactly one VarStore path.
use tch::nn::{self, Module};
use tch::Tensor;

/// `monai.networks.blocks.Convolution(conv_only=True)`: an `nn.Sequential` whose one child is
/// named `conv`, hence the extra `.conv` in every key (`P.conv.weight`).
#[derive(Debug)]
pub struct Convolution {
    conv: nn::Conv2D,
}

impl Convolution {
    pub fn new(p: &nn::Path, cin: i64, cout: i64, kernel: i64, stride: i64, padding: i64) -> Self {
        let cfg = nn::ConvConfig { stride, padding, ..Default::default() };
        Self { conv: nn::conv2d(p / "conv", cin, cout, kernel, cfg) }
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
    conv: nn::ConvTranspose2D,
}

impl TransposedConvolution {
    pub fn new(p: &nn::Path, cin: i64, cout: i64, kernel: i64, stride: i64, padding: i64) -> Self {
        let cfg = nn::ConvTransposeConfig { stride, padding, output_padding: stride - 1, ..Default::default() };
        Self { conv: nn::conv_transpose2d(p / "conv", cin, cout, kernel, cfg) }
    }
}

impl Module for TransposedConvolution {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.conv)
    }
}

/// `nn.GroupNorm(num_groups, channels, eps, affine=True)`.
pub fn group_norm(p: &nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(p, groups, channels, nn::GroupNormConfig { eps, ..Default::default() })
}

/// `monai.networks.blocks.SABlock` (self-attention over a token sequence) as used inside
/// `SpatialAttentionBlock`: `qkv_bias=True`, no dropout, no causal mask.
#[derive(Debug)]
pub struct SABlock {
    to_q: Option<nn::Linear>,
    to_k: Option<nn::Linear>,
    to_v: Option<nn::Linear>,
    qkv: Option<nn::Linear>,
    out_proj: Option<nn::Linear>,
    num_heads: i64,
    scale: f64,
    math: AttentionMath,
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

impl SABlock {
    pub fn new(
        p: &nn::Path,
        hidden_size: i64,
        num_heads: i64,
        include_fc: bool,
        use_combined_linear: bool,
        math: AttentionMath,
    ) -> Self {
        let lin = |name: &str, i, o| nn::linear(p / name, i, o, Default::default());
        let (to_q, to_k, to_v, qkv) = if use_combined_linear {
            (None, None, None, Some(lin("qkv", hidden_size, 3 * hidden_size)))
        } else {
            (
                Some(lin("to_q", hidden_size, hidden_size)),
                Some(lin("to_k", hidden_size, hidden_size)),
                Some(lin("to_v", hidden_size, hidden_size)),
                None,
            )
        };
        let out_proj = include_fc.then(|| lin("out_proj", hidden_size, hidden_size));
        let dim_head = hidden_size / num_heads;
        Self { to_q, to_k, to_v, qkv, out_proj, num_heads, scale: (dim_head as f64).powf(-0.5), math }
    }

    /// `x`: (batch, tokens, channels).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("SABlock input is (batch, tokens, channels)");
        let h = self.num_heads;
        let d = c / h;
        // "b n (l d) -> b l n d": the head index is the outer factor of the channels.
        let heads = |t: Tensor| t.view([b, n, h, d]).permute([0, 2, 1, 3]);
        let (q, k, v) = match &self.qkv {
            Some(qkv) => {
                // "b n (qkv l d) -> qkv b l n d"
                let t = x.apply(qkv).view([b, n, 3, h, d]).permute([2, 0, 3, 1, 4]);
                (t.get(0), t.get(1), t.get(2))
            }
            None => (
                heads(x.apply(self.to_q.as_ref().unwrap())),
                heads(x.apply(self.to_k.as_ref().unwrap())),
                heads(x.apply(self.to_v.as_ref().unwrap())),
            ),
        };
        let out = match self.math {
            AttentionMath::Sdpa => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, self.scale, false)
            }
            AttentionMath::Einsum => {
                let att = q.matmul(&k.transpose(-1, -2)) * self.scale;
                att.softmax(-1, None).matmul(&v)
            }
            AttentionMath::Baddbmm => {
                let (q, k, v) = (q.reshape([b * h, n, d]), k.reshape([b * h, n, d]), v.reshape([b * h, n, d]));
                let zeros = Tensor::zeros([b * h, n, n], (q.kind(), q.device()));
                let att = zeros.baddbmm(&q, &k.transpose(-1, -2), 0.0, self.scale);
                att.softmax(-1, None).bmm(&v).view([b, h, n, d])
            }
        };
        let out = out.permute([0, 2, 1, 3]).reshape([b, n, c]);
        match &self.out_proj {
            Some(o) => out.apply(o),
            None => out,
        }
    }
}

/// `monai.networks.blocks.SpatialAttentionBlock`: GroupNorm, attention over the flattened
/// spatial positions (row-major), residual.
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
        math: AttentionMath,
    ) -> Self {
        Self {
            norm: group_norm(&(p / "norm"), groups, channels, eps),
            attn: SABlock::new(&(p / "attn"), channels, num_heads, include_fc, use_combined_linear, math),
        }
    }
}

impl Module for SpatialAttentionBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let shape = x.size();
        let (b, c) = (shape[0], shape[1]);
        let h = x.apply(&self.norm).reshape([b, c, -1]).transpose(1, 2);
        let h = self.attn.forward(&h).transpose(1, 2).reshape(shape.as_slice());
        h + x
    }
}
