//! PatchDiscriminator, after MONAI 1.6.1 `monai/networks/nets/patchgan_discriminator.py` and monai-generative
//! 0.2.3 `generative/networks/nets/patchgan_discriminator.py` (Pix2PixHD's patch GAN discriminator).
//!
//! Both libraries build the same `nn.Sequential` with the same state-dict keys; they differ only in the constructor
//! argument name (`num_channels` vs `channels`) and the weight init (monai-generative keeps PyTorch's default conv
//! biases, MONAI zeroes them). `forward` returns the output of every child, the logits last.
use crate::checkpoint::Generation;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tch::{nn, Device, Kind, Tensor};

/// A MONAI layer specifier: a name (`"BATCH"`), or a name with constructor arguments
/// (`["LEAKYRELU", {"negative_slope": 0.2}]`, Python's tuple form). Names are case-insensitive, as in MONAI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSpec {
    Name(String),
    WithArgs(String, Map<String, Value>),
}

impl LayerSpec {
    fn parts(&self) -> (String, Map<String, Value>) {
        match self {
            LayerSpec::Name(n) => (n.to_lowercase(), Map::new()),
            LayerSpec::WithArgs(n, a) => (n.to_lowercase(), a.clone()),
        }
    }
}

/// Convolution padding: one value for every spatial dimension, or one per dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Padding {
    Same(i64),
    PerDim(Vec<i64>),
}

/// Constructor arguments of MONAI's `PatchDiscriminator`, with its defaults. `spatial_dims`, `channels` and
/// `in_channels` have no default there and are required here; monai-generative's `num_channels` is an alias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchDiscriminatorConfig {
    pub spatial_dims: i64,
    #[serde(alias = "num_channels")]
    pub channels: i64,
    pub in_channels: i64,
    #[serde(default = "one")]
    pub out_channels: i64,
    #[serde(default = "three")]
    pub num_layers_d: i64,
    #[serde(default = "four")]
    pub kernel_size: i64,
    /// `null` means no activation.
    #[serde(default = "default_activation")]
    pub activation: Option<LayerSpec>,
    /// `null` means no normalisation (MONAI only: monai-generative 0.2 fails on anything but a string).
    #[serde(default = "default_norm")]
    pub norm: Option<LayerSpec>,
    /// Bias of the intermediate convs (the first and last always have one).
    #[serde(default)]
    pub bias: bool,
    #[serde(default = "default_padding")]
    pub padding: Padding,
    /// MONAI's `None` (no dropout layer) reads as 0, which is the same computation.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub dropout: f64,
    /// `None`: `kernel_size`.
    #[serde(default)]
    pub last_conv_kernel_size: Option<i64>,
}

fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(0.0))
}
fn one() -> i64 {
    1
}
fn three() -> i64 {
    3
}
fn four() -> i64 {
    4
}
fn default_activation() -> Option<LayerSpec> {
    let mut args = Map::new();
    args.insert("negative_slope".into(), Value::from(0.2));
    Some(LayerSpec::WithArgs("LEAKYRELU".into(), args))
}
fn default_norm() -> Option<LayerSpec> {
    Some(LayerSpec::Name("BATCH".into()))
}
fn default_padding() -> Padding {
    Padding::Same(1)
}

/// The activations this port implements (MONAI's `Act` names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    LeakyRelu { negative_slope: f64 },
    Relu,
    Tanh,
    Sigmoid,
}

impl Activation {
    pub fn apply(&self, x: &Tensor) -> Tensor {
        match *self {
            Activation::LeakyRelu { negative_slope } => leaky_relu(x, negative_slope),
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => x.sigmoid(),
        }
    }
}

/// `F.leaky_relu(x, negative_slope)`; tch's `leaky_relu` has the slope fixed at 0.01. Bit-exact with PyTorch in
/// value and gradient: its kernel also computes `x > 0 ? x : x * (float)slope`, and the gradient of `where` is
/// `grad` or `grad * slope` per element (an element at exactly 0 takes the slope branch, as in PyTorch).
pub fn leaky_relu(x: &Tensor, negative_slope: f64) -> Tensor {
    x.where_self(&x.gt(0.0), &(x * negative_slope))
}

/// The normalisations this port implements (MONAI's `Norm` names), with PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// `BatchNormNd`: running statistics always tracked; `momentum: None` is PyTorch's cumulative average.
    Batch { eps: f64, momentum: Option<f64> },
    /// `InstanceNormNd`, without running statistics (PyTorch's default).
    Instance { eps: f64, affine: bool },
}

fn number(layer: &str, key: &str, v: &Value) -> Result<f64> {
    v.as_f64().with_context(|| format!("{layer}: argument {key} must be a number, got {v}"))
}

fn boolean(layer: &str, key: &str, v: &Value) -> Result<bool> {
    v.as_bool().with_context(|| format!("{layer}: argument {key} must be a boolean, got {v}"))
}

impl PatchDiscriminatorConfig {
    /// MONAI's defaults for everything but the three required arguments.
    pub fn new(spatial_dims: i64, channels: i64, in_channels: i64) -> Self {
        Self {
            spatial_dims,
            channels,
            in_channels,
            out_channels: 1,
            num_layers_d: 3,
            kernel_size: 4,
            activation: default_activation(),
            norm: default_norm(),
            bias: false,
            padding: default_padding(),
            dropout: 0.0,
            last_conv_kernel_size: None,
        }
    }

    /// The reference repository's discriminator (`aekl_v0.yaml`: 128 channels, 3 layers, 1 channel in and out).
    pub fn reference() -> Self {
        Self::new(2, 128, 1)
    }

    /// The activation, checked. Arguments are PyTorch's constructor arguments (`inplace` has no effect here).
    pub fn activation(&self) -> Result<Option<Activation>> {
        let Some(spec) = &self.activation else { return Ok(None) };
        let (name, args) = spec.parts();
        let what = format!("PatchDiscriminator activation {name}");
        let mut act = match name.as_str() {
            "leakyrelu" => Activation::LeakyRelu { negative_slope: 0.01 },
            "relu" => Activation::Relu,
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            _ => bail!("{what}: not supported (medgen implements leakyrelu, relu, tanh, sigmoid, or null for none)"),
        };
        for (k, v) in &args {
            match (&mut act, k.as_str()) {
                (Activation::LeakyRelu { negative_slope }, "negative_slope") => *negative_slope = number(&what, k, v)?,
                (Activation::LeakyRelu { .. } | Activation::Relu, "inplace") => {
                    boolean(&what, k, v)?;
                }
                _ => bail!("{what}: unknown argument {k}"),
            }
        }
        Ok(Some(act))
    }

    /// The normalisation of the intermediate blocks, checked.
    pub fn norm(&self) -> Result<Option<Norm>> {
        let Some(spec) = &self.norm else { return Ok(None) };
        let (name, args) = spec.parts();
        let what = format!("PatchDiscriminator norm {name}");
        let mut norm = match name.as_str() {
            "batch" => Norm::Batch { eps: 1e-5, momentum: Some(0.1) },
            "instance" => Norm::Instance { eps: 1e-5, affine: false },
            _ => bail!("{what}: not supported (medgen implements batch, instance, or null for none)"),
        };
        for (k, v) in &args {
            match (&mut norm, k.as_str()) {
                (Norm::Batch { eps, .. } | Norm::Instance { eps, .. }, "eps") => *eps = number(&what, k, v)?,
                (Norm::Batch { momentum, .. }, "momentum") => {
                    *momentum = if v.is_null() { None } else { Some(number(&what, k, v)?) }
                }
                // Without running statistics the momentum is never used.
                (Norm::Instance { .. }, "momentum") if v.is_null() => {}
                (Norm::Instance { .. }, "momentum") => {
                    number(&what, k, v)?;
                }
                (Norm::Instance { affine, .. }, "affine") => *affine = boolean(&what, k, v)?,
                // MONAI's init writes into the BatchNorm weight: without one its constructor fails.
                (Norm::Batch { .. }, "affine") => {
                    ensure!(
                        boolean(&what, k, v)?,
                        "{what}: affine=False cannot be built by MONAI (its init needs a weight)"
                    )
                }
                (Norm::Batch { .. }, "track_running_stats") => {
                    ensure!(boolean(&what, k, v)?, "{what}: track_running_stats=False is not supported")
                }
                (Norm::Instance { .. }, "track_running_stats") => {
                    ensure!(!boolean(&what, k, v)?, "{what}: track_running_stats=True is not supported")
                }
                _ => bail!("{what}: unknown or unsupported argument {k}"),
            }
        }
        Ok(Some(norm))
    }

    /// Padding of the strided convs, one value per spatial dimension.
    pub fn padding_per_dim(&self) -> Result<Vec<i64>> {
        let n = self.spatial_dims as usize;
        let p = match &self.padding {
            Padding::Same(p) => vec![*p; n],
            Padding::PerDim(v) => v.clone(),
        };
        ensure!(p.len() == n, "PatchDiscriminator padding {p:?}: expected one value per spatial dimension ({n})");
        ensure!(p.iter().all(|&v| v >= 0), "PatchDiscriminator padding {p:?} must not be negative");
        Ok(p)
    }

    pub fn last_kernel_size(&self) -> i64 {
        self.last_conv_kernel_size.unwrap_or(self.kernel_size)
    }

    /// The checks MONAI's constructor makes (by failing), plus what this port supports.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=3).contains(&self.spatial_dims),
            "PatchDiscriminator: spatial_dims must be 1, 2 or 3, got {}",
            self.spatial_dims
        );
        ensure!(
            self.channels > 0 && self.in_channels > 0 && self.out_channels > 0,
            "PatchDiscriminator: channels ({}), in_channels ({}) and out_channels ({}) must be positive",
            self.channels,
            self.in_channels,
            self.out_channels
        );
        ensure!(
            self.num_layers_d >= 0,
            "PatchDiscriminator: num_layers_d must not be negative, got {}",
            self.num_layers_d
        );
        ensure!(
            self.kernel_size > 0 && self.last_kernel_size() > 0,
            "PatchDiscriminator: kernel sizes must be positive (kernel_size {}, last_conv_kernel_size {:?})",
            self.kernel_size,
            self.last_conv_kernel_size
        );
        ensure!(
            (0.0..=1.0).contains(&self.dropout),
            "PatchDiscriminator: dropout must be in [0, 1], got {}",
            self.dropout
        );
        self.padding_per_dim()?;
        self.activation()?;
        self.norm()?;
        Ok(())
    }
}

/// `nn.ConvNd` over 1, 2 or 3 spatial dimensions, variables `weight` and `bias`.
#[derive(Debug)]
struct ConvNd {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: Vec<i64>,
    padding: Vec<i64>,
}

impl ConvNd {
    #[allow(clippy::too_many_arguments)]
    fn new(p: &nn::Path, dims: usize, cin: i64, cout: i64, k: i64, stride: i64, padding: Vec<i64>, bias: bool) -> Self {
        let mut shape = vec![cout, cin];
        shape.extend(std::iter::repeat_n(k, dims));
        // Placeholders: `reset_parameters` draws every value, in PyTorch's order.
        Self {
            weight: p.zeros("weight", &shape),
            bias: bias.then(|| p.zeros("bias", &[cout])),
            stride: vec![stride; dims],
            padding,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = self.stride.len();
        let dil = vec![1; dims];
        let (w, b, s, p) = (&self.weight, self.bias.as_ref(), &self.stride, &self.padding);
        Ok(match dims {
            1 => x.f_conv1d(w, b, s, p, &dil, 1)?,
            2 => x.f_conv2d(w, b, s, p, &dil, 1)?,
            _ => x.f_conv3d(w, b, s, p, &dil, 1)?,
        })
    }

    /// `fan_in` of PyTorch's default init: input channels times the kernel volume.
    fn fan_in(&self) -> i64 {
        self.weight.size()[1..].iter().product()
    }
}

/// `nn.BatchNormNd(affine=True, track_running_stats=True)`. `num_batches_tracked` is a variable of the store (int64,
/// not trainable) so that state dicts round-trip with PyTorch's; it counts train-mode calls and sets the
/// averaging factor when `momentum` is `None`.
#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    eps: f64,
    momentum: Option<f64>,
}

impl BatchNorm {
    fn new(p: &nn::Path, c: i64, eps: f64, momentum: Option<f64>) -> Self {
        Self {
            weight: p.ones("weight", &[c]),
            bias: p.zeros("bias", &[c]),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
            num_batches_tracked: p.add(
                "num_batches_tracked",
                Tensor::zeros([0i64; 0], (Kind::Int64, p.device())),
                false,
            ),
            eps,
            momentum,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut factor = self.momentum.unwrap_or(0.0);
        if train {
            let _ = tch::no_grad(|| self.num_batches_tracked.shallow_clone().f_add_scalar_(1))?;
            if self.momentum.is_none() {
                factor = 1.0 / i64::try_from(&self.num_batches_tracked)? as f64;
            }
        }
        // In train mode libtorch normalises with the batch statistics and updates the running ones in place.
        Ok(x.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            factor,
            self.eps,
            true,
        )?)
    }
}

/// `nn.InstanceNormNd(track_running_stats=False)`: per-sample statistics in train and eval mode alike.
#[derive(Debug)]
struct InstanceNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl InstanceNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let none: Option<&Tensor> = None;
        Ok(x.f_instance_norm(self.weight.as_ref(), self.bias.as_ref(), none, none, true, 0.1, self.eps, true)?)
    }
}

#[derive(Debug)]
enum NormLayer {
    Batch(BatchNorm),
    Instance(InstanceNorm),
}

/// MONAI's `Convolution`: the conv under `conv`, then its `adn` in the order "NDA" (norm, dropout, activation)
/// with the norm under `adn.N`. The last block is `conv_only`.
#[derive(Debug)]
struct ConvBlock {
    name: String,
    conv: ConvNd,
    norm: Option<NormLayer>,
    dropout: f64,
    act: Option<Activation>,
}

impl ConvBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.conv.forward(x)?;
        match &self.norm {
            Some(NormLayer::Batch(n)) => h = n.forward(&h, train)?,
            Some(NormLayer::Instance(n)) => h = n.forward(&h)?,
            None => {}
        }
        // PyTorch's dropout with p = 0 returns its input and draws nothing; skipping it changes nothing.
        if train && self.dropout > 0.0 {
            h = h.f_dropout(self.dropout, true)?;
        }
        if let Some(a) = &self.act {
            h = a.apply(&h);
        }
        Ok(h)
    }
}

/// Patch-GAN discriminator. Children, in order: `initial_conv` (stride 2, bias, no norm), `0`..`num_layers_d-1`
/// (channels doubling, stride 2 but 1 for the last, norm), `final_conv` (stride 1, bias, conv only).
#[derive(Debug)]
pub struct PatchDiscriminator {
    blocks: Vec<ConvBlock>,
    cfg: PatchDiscriminatorConfig,
}

impl PatchDiscriminator {
    /// Builds the network under `p` and initialises it as monai-generative 0.2's constructor does (the reference
    /// training's library), drawing from tch's global generator in PyTorch's order: after `tch::manual_seed(s)` the
    /// weights equal those of `torch.manual_seed(s); PatchDiscriminator(...)`. See [`Self::reset_parameters`].
    pub fn new(p: &nn::Path, cfg: &PatchDiscriminatorConfig) -> Result<Self> {
        cfg.validate()?;
        let dims = cfg.spatial_dims as usize;
        let (act, norm, pad) = (cfg.activation()?, cfg.norm()?, cfg.padding_per_dim()?);
        let k = cfg.kernel_size;
        let adn_norm = |p: &nn::Path, c: i64| -> Option<NormLayer> {
            let p = &(p / "adn" / "N");
            match norm? {
                Norm::Batch { eps, momentum } => Some(NormLayer::Batch(BatchNorm::new(p, c, eps, momentum))),
                Norm::Instance { eps, affine } => Some(NormLayer::Instance(InstanceNorm {
                    weight: affine.then(|| p.ones("weight", &[c])),
                    bias: affine.then(|| p.zeros("bias", &[c])),
                    eps,
                })),
            }
        };
        let mut blocks = Vec::new();
        let q = p / "initial_conv";
        blocks.push(ConvBlock {
            name: "initial_conv".into(),
            conv: ConvNd::new(&(&q / "conv"), dims, cfg.in_channels, cfg.channels, k, 2, pad.clone(), true),
            norm: None,
            dropout: cfg.dropout,
            act,
        });
        let mut cin = cfg.channels;
        for i in 0..cfg.num_layers_d {
            let stride = if i == cfg.num_layers_d - 1 { 1 } else { 2 };
            let q = p / i.to_string();
            blocks.push(ConvBlock {
                name: i.to_string(),
                conv: ConvNd::new(&(&q / "conv"), dims, cin, cin * 2, k, stride, pad.clone(), cfg.bias),
                norm: adn_norm(&q, cin * 2),
                dropout: cfg.dropout,
                act,
            });
            cin *= 2;
        }
        let lk = cfg.last_kernel_size();
        let q = p / "final_conv";
        blocks.push(ConvBlock {
            name: "final_conv".into(),
            conv: ConvNd::new(&(&q / "conv"), dims, cin, cfg.out_channels, lk, 1, vec![(lk - 1) / 2; dims], true),
            norm: None,
            dropout: 0.0,
            act: None,
        });
        let d = Self { blocks, cfg: cfg.clone() };
        d.reset_parameters(Generation::Generative)?;
        Ok(d)
    }

    pub fn config(&self) -> &PatchDiscriminatorConfig {
        &self.cfg
    }

    /// Redraws every parameter and resets the BatchNorm buffers, as the library's constructor does after
    /// `torch.manual_seed`: PyTorch's default conv init (kaiming-uniform weights with `a = sqrt(5)`, uniform biases),
    /// then the library's init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0.
    /// `Generation::Generative` (monai-generative 0.2 `initialise_weights`, what the reference trained with) keeps
    /// the default conv biases; `Generation::Monai` (MONAI's `normal_init`) zeroes them. Values are drawn on the CPU
    /// in float32 and copied, so they do not depend on the store's device.
    pub fn reset_parameters(&self, init: Generation) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for b in &self.blocks {
                let fan_in = b.conv.fan_in() as f64;
                let a = 5f64.sqrt();
                let gain = (2.0 / (1.0 + a.powf(2.0))).sqrt();
                let bound = 3f64.sqrt() * (gain / fan_in.sqrt());
                fill(&b.conv.weight, |t| t.f_uniform_(-bound, bound))?;
                if let Some(bias) = &b.conv.bias {
                    let bound = 1.0 / fan_in.sqrt();
                    fill(bias, |t| t.f_uniform_(-bound, bound))?;
                }
                match &b.norm {
                    Some(NormLayer::Batch(n)) => {
                        set(&n.weight, 1.0)?;
                        set(&n.bias, 0.0)?;
                        set(&n.running_mean, 0.0)?;
                        set(&n.running_var, 1.0)?;
                        set(&n.num_batches_tracked, 0.0)?;
                    }
                    Some(NormLayer::Instance(n)) => {
                        if let (Some(w), Some(bias)) = (&n.weight, &n.bias) {
                            set(w, 1.0)?;
                            set(bias, 0.0)?;
                        }
                    }
                    None => {}
                }
            }
            // `Module.apply` visits each Convolution's conv, then its norm, block by block.
            for b in &self.blocks {
                fill(&b.conv.weight, |t| t.f_normal_(0.0, 0.02))?;
                if let (Some(bias), Generation::Monai) = (&b.conv.bias, init) {
                    set(bias, 0.0)?;
                }
                if let Some(NormLayer::Batch(n)) = &b.norm {
                    fill(&n.weight, |t| t.f_normal_(1.0, 0.02))?;
                    set(&n.bias, 0.0)?;
                }
            }
            Ok(())
        })
    }

    /// The output of every child, in order; the last is the logits map. `train` selects batch statistics (and
    /// updates the running ones) and dropout, as `module.train()` does.
    pub fn f_forward_t(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let want = self.cfg.spatial_dims as usize + 2;
        ensure!(
            x.dim() == want && x.size()[1] == self.cfg.in_channels,
            "PatchDiscriminator: input of shape {:?}, expected (batch, {} channels, {} spatial dims)",
            x.size(),
            self.cfg.in_channels,
            self.cfg.spatial_dims
        );
        let mut outs: Vec<Tensor> = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let h = outs.last().unwrap_or(x);
            let y = b
                .forward(h, train)
                .with_context(|| format!("PatchDiscriminator block {} on an input of shape {:?}", b.name, h.size()))?;
            outs.push(y);
        }
        Ok(outs)
    }

    /// [`Self::f_forward_t`], panicking on an input of the wrong shape.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        self.f_forward_t(x, train).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The logits map alone (what the reference training uses, `discriminator(x)[-1]`).
    pub fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.f_forward_t(x, train)?.pop().expect("the discriminator has at least two blocks"))
    }
}

/// Sets every element of a variable (under `no_grad`).
fn set(var: &Tensor, value: f64) -> Result<()> {
    let _ = var.shallow_clone().f_fill_(value)?;
    Ok(())
}

/// Draws into a float32 CPU tensor shaped like `var` and copies it in, so the draws are PyTorch's CPU ones.
fn fill(var: &Tensor, draw: impl FnOnce(&mut Tensor) -> Result<Tensor, tch::TchError>) -> Result<()> {
    let mut t = Tensor::f_empty(var.size(), (Kind::Float, Device::Cpu))?;
    let _ = draw(&mut t)?;
    var.shallow_clone().f_copy_(&t)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<PatchDiscriminatorConfig> {
        let cfg: PatchDiscriminatorConfig = serde_json::from_str(json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn config_defaults_aliases_and_layer_specs() {
        let cfg = parse(r#"{"spatial_dims": 2, "num_channels": 128, "num_layers_d": 3, "in_channels": 1}"#).unwrap();
        assert_eq!(cfg, PatchDiscriminatorConfig::reference());
        assert_eq!(cfg.activation().unwrap(), Some(Activation::LeakyRelu { negative_slope: 0.2 }));
        assert_eq!(cfg.norm().unwrap(), Some(Norm::Batch { eps: 1e-5, momentum: Some(0.1) }));
        let cfg = parse(
            r#"{"spatial_dims": 3, "channels": 8, "in_channels": 2, "activation": "LeakyReLU",
                "norm": ["instance", {"affine": true, "eps": 0.001}], "padding": [1, 2, 0]}"#,
        )
        .unwrap();
        assert_eq!(cfg.activation().unwrap(), Some(Activation::LeakyRelu { negative_slope: 0.01 }));
        assert_eq!(cfg.norm().unwrap(), Some(Norm::Instance { eps: 1e-3, affine: true }));
        assert_eq!(cfg.padding_per_dim().unwrap(), vec![1, 2, 0]);
        let cfg = parse(
            r#"{"spatial_dims": 2, "channels": 8, "in_channels": 1,
                "activation": null, "norm": ["BATCH", {"momentum": null}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.activation().unwrap(), None);
        assert_eq!(cfg.norm().unwrap(), Some(Norm::Batch { eps: 1e-5, momentum: None }));
        let cfg = parse(r#"{"spatial_dims": 1, "channels": 8, "in_channels": 1, "dropout": null}"#).unwrap();
        assert_eq!(cfg.dropout, 0.0);
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err = |json: &str| format!("{:#}", parse(json).unwrap_err());
        let base = r#""spatial_dims": 2, "channels": 8, "in_channels": 1"#;
        assert!(err(&format!(r#"{{{base}, "activation": "prelu"}}"#)).contains("activation prelu"));
        assert!(err(&format!(r#"{{{base}, "activation": ["leakyrelu", {{"slope": 0.1}}]}}"#)).contains("slope"));
        assert!(err(&format!(r#"{{{base}, "norm": "group"}}"#)).contains("norm group"));
        assert!(err(&format!(r#"{{{base}, "norm": ["batch", {{"affine": false}}]}}"#)).contains("affine"));
        assert!(err(&format!(r#"{{{base}, "padding": [1, 1, 1]}}"#)).contains("padding"));
        assert!(err(&format!(r#"{{{base}, "dropout": 1.5}}"#)).contains("dropout"));
        assert!(err(&format!(r#"{{{base}, "num_layer_d": 2}}"#)).contains("num_layer_d"));
        assert!(err(r#"{"spatial_dims": 2, "in_channels": 1}"#).contains("channels"));
    }

    #[test]
    fn reference_layout_keys_and_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let d = PatchDiscriminator::new(&vs.root(), &PatchDiscriminatorConfig::reference()).unwrap();
        let vars = vs.variables();
        let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(params, 11_032_193, "parameter count of the reference discriminator");
        assert_eq!(vars["2.adn.N.num_batches_tracked"].kind(), Kind::Int64);
        assert!(!vars.contains_key("2.conv.bias") && vars.contains_key("final_conv.conv.bias"));
        let x = Tensor::zeros([1, 1, 64, 64], (Kind::Float, Device::Cpu));
        let shapes: Vec<Vec<i64>> = d.forward_t(&x, false).iter().map(|t| t.size()).collect();
        let want = [[1, 128, 32, 32], [1, 256, 16, 16], [1, 512, 8, 8], [1, 1024, 7, 7], [1, 1, 6, 6]];
        assert_eq!(shapes, want.map(|s| s.to_vec()).to_vec());
        assert!(format!("{:#}", d.f_forward_t(&x.repeat([1, 2, 1, 1]), false).unwrap_err()).contains("[1, 2, 64, 64]"));
    }

    #[test]
    fn train_mode_counts_batches() {
        let vs = nn::VarStore::new(Device::Cpu);
        let d = PatchDiscriminator::new(&vs.root(), &PatchDiscriminatorConfig::new(2, 4, 1)).unwrap();
        let x = Tensor::randn([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        d.forward_t(&x, false);
        d.forward_t(&x, true);
        d.forward_t(&x, true);
        let n = i64::try_from(&vs.variables()["0.adn.N.num_batches_tracked"]).unwrap();
        assert_eq!(n, 2);
    }
}
