//! LPIPS (Zhang et al., "The unreasonable effectiveness of deep features as a perceptual metric") as the `lpips`
//! package v0.1 computes it with `lpips=True, spatial=False` in eval mode: a fixed input scaling, a torchvision
//! ImageNet trunk cut into slices whose last ReLU outputs are the taps, channel-wise unit normalisation of each tap,
//! squared differences weighted by the calibrated 1x1 `lin` heads, spatially averaged and summed over taps.
//!
//! Two weight files are needed. The `lin` heads ship in the `lpips` wheel (`lpips/weights/v0.1/<net>.pth`, legacy
//! torch format, keys `lin{k}.model.1.weight`). The trunk is torchvision's ImageNet model, which no package ships:
//! the user supplies it (`alexnet-owt-7be5be79.pth`, `vgg16-397923af.pth` or `squeezenet1_1-b8a52dc0.pth`, keys
//! `features.N.*`; or a saved `lpips.LPIPS` / MONAI `PerceptualLoss` state dict, keys `net.sliceK.N.*`). There is no
//! random initialisation: every weight comes from a file, loaded strictly.
use crate::checkpoint::{load_strict, StateDict};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// `normalize_tensor`'s epsilon, added to the channel norm (not under the square root).
const NORM_EPS: f64 = 1e-10;
/// The v0.1 `ScalingLayer`: `(x - shift) / scale`, per RGB channel.
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];
/// MONAI's `PerceptualLoss` holds the LPIPS module under this attribute, so its state-dict keys carry it.
const MONAI_PREFIX: &str = "perceptual_function.";

/// The trunks LPIPS v0.1 has calibrated heads for (`lpips.LPIPS(net=...)`, MONAI's `network_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LpipsNet {
    Alex,
    Vgg,
    Squeeze,
}

impl LpipsNet {
    pub const ALL: [LpipsNet; 3] = [LpipsNet::Alex, LpipsNet::Vgg, LpipsNet::Squeeze];

    pub fn name(self) -> &'static str {
        match self {
            LpipsNet::Alex => "alex",
            LpipsNet::Vgg => "vgg",
            LpipsNet::Squeeze => "squeeze",
        }
    }

    /// The torchvision model whose `features` are the trunk.
    pub fn torchvision_model(self) -> &'static str {
        match self {
            LpipsNet::Alex => "alexnet",
            LpipsNet::Vgg => "vgg16",
            LpipsNet::Squeeze => "squeezenet1_1",
        }
    }

    /// The file torchvision downloads for the ImageNet weights `lpips` uses.
    pub fn torchvision_file(self) -> &'static str {
        match self {
            LpipsNet::Alex => "alexnet-owt-7be5be79.pth",
            LpipsNet::Vgg => "vgg16-397923af.pth",
            LpipsNet::Squeeze => "squeezenet1_1-b8a52dc0.pth",
        }
    }

    /// Channels of each tap, i.e. the input width of each `lin` head.
    pub fn channels(self) -> &'static [i64] {
        match self {
            LpipsNet::Alex => &[64, 192, 384, 256, 256],
            LpipsNet::Vgg => &[64, 128, 256, 512, 512],
            LpipsNet::Squeeze => &[64, 128, 256, 384, 384, 512, 512],
        }
    }

    /// End (exclusive) of each slice in torchvision `features` indices; each slice ends on a ReLU (or, for
    /// squeezenet, a Fire module, whose output is ReLU'd), so the taps are post-activation maps.
    fn slice_ends(self) -> &'static [usize] {
        match self {
            LpipsNet::Alex => &[2, 5, 8, 10, 12],
            LpipsNet::Vgg => &[4, 9, 16, 23, 30],
            LpipsNet::Squeeze => &[2, 5, 8, 10, 11, 12, 13],
        }
    }

    /// The slice (1-based, as `net.sliceK`) holding `features[index]`, if any.
    fn slice_of(self, index: usize) -> Option<usize> {
        self.slice_ends().iter().position(|&end| index < end).map(|k| k + 1)
    }

    /// The lin-head file inside the installed `lpips` package directory.
    pub fn wheel_lin_file(self) -> String {
        format!("weights/v0.1/{}.pth", self.name())
    }
}

impl fmt::Display for LpipsNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LpipsNet {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        // MONAI lower-cases `network_type` before matching.
        let lower = s.to_ascii_lowercase();
        LpipsNet::ALL.into_iter().find(|n| n.name() == lower).with_context(|| {
            format!("unknown LPIPS network {s:?}; expected one of alex, vgg, squeeze (lpips v0.1 heads)")
        })
    }
}

/// The wheel's lin-head file for `net` in a Python virtual environment (`<venv>/lib/python3*/site-packages/lpips`).
pub fn wheel_lin_weights(venv: &Path, net: LpipsNet) -> Result<PathBuf> {
    let lib = venv.join("lib");
    let mut looked = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&lib) {
        let mut pythons: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        pythons.sort();
        for py in pythons {
            let candidate = py.join("site-packages/lpips").join(net.wheel_lin_file());
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked.push(candidate.display().to_string());
        }
    }
    if looked.is_empty() {
        looked.push(format!("{}/python3*/site-packages/lpips/{}", lib.display(), net.wheel_lin_file()));
    }
    bail!("the lpips wheel's {} lin heads are not installed: looked for {}", net, looked.join(", "))
}

/// What an entry of an LPIPS-related checkpoint is, under medgen's names.
enum Entry {
    Lin(String),
    Backbone(String),
    /// Present in such files but not a weight LPIPS needs (aliases, constants, the ImageNet classifier).
    Ignored(&'static str),
    /// Anything else: kept, so that the strict load names it as unexpected.
    Other(String),
}

fn classify(net: LpipsNet, key: &str) -> Entry {
    let key = key.strip_prefix(MONAI_PREFIX).unwrap_or(key);
    if key.starts_with("lins.") {
        return Entry::Ignored("lins.* (lpips' ModuleList aliases of lin*)");
    }
    if key.starts_with("scaling_layer.") {
        return Entry::Ignored("scaling_layer.* (constants)");
    }
    if key.starts_with("classifier.") {
        return Entry::Ignored("classifier.* (torchvision's ImageNet head, unused by LPIPS)");
    }
    if key.strip_prefix("lin").and_then(|r| r.chars().next()).is_some_and(|c| c.is_ascii_digit()) {
        return Entry::Lin(key.to_string());
    }
    if key.starts_with("features.") {
        return Entry::Backbone(key.to_string());
    }
    // lpips' own module: `net.slice{K}.{N}.rest` holds torchvision's `features[N]`.
    if let Some(rest) = key.strip_prefix("net.slice") {
        let mut parts = rest.splitn(3, '.');
        let (k, n, tail) = (parts.next(), parts.next(), parts.next());
        if let (Some(Ok(k)), Some(Ok(n)), Some(tail)) = (k.map(str::parse::<usize>), n.map(str::parse::<usize>), tail) {
            if net.slice_of(n) == Some(k) {
                return Entry::Backbone(format!("features.{n}.{tail}"));
            }
        }
    }
    Entry::Other(key.to_string())
}

/// The lin-head (`lin`) or trunk (`!lin`) entries of `sd` under medgen's names, plus the unrecognised ones (so the
/// strict load reports them); what was ignored or renamed goes to `notes`.
fn select(net: LpipsNet, sd: &StateDict, lin: bool, notes: &mut Vec<String>) -> StateDict {
    let mut out = StateDict::new();
    let mut dropped: Vec<(&'static str, usize)> = Vec::new();
    let mut renamed = 0;
    for (name, t) in sd.iter() {
        match classify(net, name) {
            Entry::Lin(n) if lin => out.insert(n, t.shallow_clone()),
            Entry::Backbone(n) if !lin => {
                renamed += usize::from(&n != name);
                out.insert(n, t.shallow_clone())
            }
            Entry::Other(n) => out.insert(n, t.shallow_clone()),
            Entry::Lin(_) | Entry::Backbone(_) => {}
            Entry::Ignored(what) => match dropped.iter_mut().find(|(w, _)| *w == what) {
                Some((_, c)) => *c += 1,
                None => dropped.push((what, 1)),
            },
        }
    }
    for (what, count) in dropped {
        notes.push(format!("ignored {count} entries {what}"));
    }
    if renamed > 0 {
        notes.push(format!("renamed {renamed} entries to torchvision's features.N names"));
    }
    out
}

/// A conv whose weights come only from a checkpoint (created as zeros, never trained).
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv {
    fn new(p: &nn::Path, cin: i64, cout: i64, kernel: i64, stride: i64, padding: i64) -> Self {
        Self {
            weight: p.zeros_no_train("weight", &[cout, cin, kernel, kernel]),
            bias: p.zeros_no_train("bias", &[cout]),
            stride,
            padding,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (s, p) = (self.stride, self.padding);
        Ok(x.f_conv2d(&self.weight, Some(&self.bias), [s, s], [p, p], [1, 1], 1)?)
    }
}

/// torchvision's SqueezeNet `Fire`: squeeze 1x1 + ReLU, then the ReLU'd 1x1 and 3x3 expansions concatenated.
#[derive(Debug)]
struct Fire {
    squeeze: Conv,
    expand1x1: Conv,
    expand3x3: Conv,
}

impl Fire {
    fn new(p: &nn::Path, cin: i64, squeeze: i64, e1: i64, e3: i64) -> Self {
        Self {
            squeeze: Conv::new(&(p / "squeeze"), cin, squeeze, 1, 1, 0),
            expand1x1: Conv::new(&(p / "expand1x1"), squeeze, e1, 1, 1, 0),
            expand3x3: Conv::new(&(p / "expand3x3"), squeeze, e3, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.squeeze.forward(x)?.f_relu()?;
        let a = self.expand1x1.forward(&s)?.f_relu()?;
        let b = self.expand3x3.forward(&s)?.f_relu()?;
        Ok(Tensor::f_cat(&[a, b], 1)?)
    }
}

/// One entry of torchvision's `features` Sequential.
#[derive(Debug)]
enum Layer {
    Conv(Conv),
    // torchvision's ReLUs are in place; the value (and the gradient, taken from the output) is the same.
    Relu,
    MaxPool { kernel: i64, stride: i64, ceil_mode: bool },
    Fire(Fire),
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Layer::Conv(c) => c.forward(x)?,
            Layer::Relu => x.f_relu()?,
            Layer::MaxPool { kernel, stride, ceil_mode } => {
                x.f_max_pool2d([*kernel, *kernel], [*stride, *stride], [0, 0], [1, 1], *ceil_mode)?
            }
            Layer::Fire(f) => f.forward(x)?,
        })
    }
}

/// torchvision's `features[..last slice end]` for `net`, under `p / "features" / N`.
fn build_trunk(p: &nn::Path, net: LpipsNet) -> Vec<Layer> {
    let f = p / "features";
    let conv = |i: usize, cin, cout, k, s, pad| Layer::Conv(Conv::new(&(&f / i), cin, cout, k, s, pad));
    let fire = |i: usize, cin, sq, e| Layer::Fire(Fire::new(&(&f / i), cin, sq, e, e));
    match net {
        LpipsNet::Alex => {
            let pool = || Layer::MaxPool { kernel: 3, stride: 2, ceil_mode: false };
            vec![
                conv(0, 3, 64, 11, 4, 2),
                Layer::Relu,
                pool(),
                conv(3, 64, 192, 5, 1, 2),
                Layer::Relu,
                pool(),
                conv(6, 192, 384, 3, 1, 1),
                Layer::Relu,
                conv(8, 384, 256, 3, 1, 1),
                Layer::Relu,
                conv(10, 256, 256, 3, 1, 1),
                Layer::Relu,
            ]
        }
        LpipsNet::Vgg => {
            // vgg16 ("D"): 0 = 2x2 max pool; the trunk stops at relu5_3, before the last pool.
            let cfg = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512];
            let mut layers = Vec::new();
            let mut cin = 3;
            for c in cfg {
                if c == 0 {
                    layers.push(Layer::MaxPool { kernel: 2, stride: 2, ceil_mode: false });
                } else {
                    layers.push(conv(layers.len(), cin, c, 3, 1, 1));
                    layers.push(Layer::Relu);
                    cin = c;
                }
            }
            layers
        }
        LpipsNet::Squeeze => {
            // squeezenet1_1's pools round up, unlike alexnet's.
            let pool = || Layer::MaxPool { kernel: 3, stride: 2, ceil_mode: true };
            vec![
                conv(0, 3, 64, 3, 2, 0),
                Layer::Relu,
                pool(),
                fire(3, 64, 16, 64),
                fire(4, 128, 16, 64),
                pool(),
                fire(6, 128, 32, 128),
                fire(7, 256, 32, 128),
                pool(),
                fire(9, 256, 48, 192),
                fire(10, 384, 48, 192),
                fire(11, 384, 64, 256),
                fire(12, 512, 64, 256),
            ]
        }
    }
}

/// `x / (||x||_channels + 1e-10)`, written as `lpips.normalize_tensor` is so that the rounding is the same.
fn unit_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.f_pow_tensor_scalar(2)?.f_sum_dim_intlist(&[1i64][..], true, None::<Kind>)?.f_sqrt()?;
    Ok(x.f_div(&norm.f_add_scalar(NORM_EPS)?)?)
}

/// The LPIPS network with frozen weights: differentiable w.r.t. its inputs, with no trainable variable.
#[derive(Debug)]
pub struct Lpips {
    net: LpipsNet,
    trunk: Vec<Layer>,
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
    trunk_vs: VarStore,
    lin_vs: VarStore,
    /// What the loaders decided (entries ignored or renamed), for reporting.
    pub notes: Vec<String>,
}

impl Lpips {
    /// Loads the lin heads (the wheel's `lpips/weights/v0.1/<net>.pth`, or a saved LPIPS/PerceptualLoss state dict)
    /// and the ImageNet trunk (a torchvision checkpoint, or such a state dict).
    pub fn load(net: LpipsNet, lin_weights: &Path, backbone_weights: &Path, device: Device) -> Result<Self> {
        let lin = StateDict::load(lin_weights, None)
            .with_context(|| format!("reading the LPIPS {net} lin heads {}", lin_weights.display()))?;
        let trunk = StateDict::load(backbone_weights, None)
            .with_context(|| format!("reading the LPIPS {net} backbone {}", backbone_weights.display()))?;
        Self::build(
            net,
            &lin,
            &trunk,
            device,
            &lin_weights.display().to_string(),
            &backbone_weights.display().to_string(),
        )
    }

    /// From state dicts already in memory. The backbone is whatever `backbone` holds: parity tests pass the random
    /// trunk they generated; a real loss needs torchvision's ImageNet weights.
    pub fn with_backbone_weights(net: LpipsNet, lin: &StateDict, backbone: &StateDict, device: Device) -> Result<Self> {
        Self::build(net, lin, backbone, device, "the lin state dict", "the backbone state dict")
    }

    fn build(
        net: LpipsNet,
        lin: &StateDict,
        backbone: &StateDict,
        device: Device,
        lin_src: &str,
        backbone_src: &str,
    ) -> Result<Self> {
        let mut notes = Vec::new();
        let trunk_vs = VarStore::new(device);
        let trunk = build_trunk(&trunk_vs.root(), net);
        let trunk_sd = select(net, backbone, false, &mut notes);
        load_strict(&trunk_vs, &trunk_sd).with_context(|| {
            format!(
                "{backbone_src} is not a torchvision {} trunk for LPIPS {net} (features.N.* keys expected)",
                net.torchvision_model()
            )
        })?;
        let lin_vs = VarStore::new(device);
        let lins = net
            .channels()
            .iter()
            .enumerate()
            .map(|(k, &c)| (lin_vs.root() / format!("lin{k}") / "model" / "1").zeros_no_train("weight", &[1, c, 1, 1]))
            .collect();
        let lin_sd = select(net, lin, true, &mut notes);
        load_strict(&lin_vs, &lin_sd)
            .with_context(|| format!("{lin_src} does not hold the LPIPS v0.1 {net} lin heads"))?;
        let constant = |v: &[f32; 3]| Tensor::from_slice(v).view([1, 3, 1, 1]).to_device(device);
        Ok(Self { net, trunk, lins, shift: constant(&SHIFT), scale: constant(&SCALE), trunk_vs, lin_vs, notes })
    }

    pub fn net(&self) -> LpipsNet {
        self.net
    }

    pub fn device(&self) -> Device {
        self.trunk_vs.device()
    }

    /// Every weight (trunk and heads) by name; none requires grad.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.trunk_vs.variables().into_iter().collect();
        v.extend(self.lin_vs.variables());
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The taps: the output of each slice of the trunk.
    fn taps(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        // v0.1's ScalingLayer; a one-channel image broadcasts against the (1,3,1,1) constants to three channels.
        let mut h = x.f_sub(&self.shift)?.f_div(&self.scale)?;
        let mut taps = Vec::new();
        let mut start = 0;
        for &end in self.net.slice_ends() {
            for layer in &self.trunk[start..end] {
                h = layer.forward(&h)?;
            }
            taps.push(h.shallow_clone());
            start = end;
        }
        Ok(taps)
    }

    fn check_input(&self, name: &str, x: &Tensor) -> Result<()> {
        let s = x.size();
        ensure!(s.len() == 4, "LPIPS {name} must be (batch, channels, height, width), got shape {s:?}");
        ensure!(
            s[1] == 1 || s[1] == 3,
            "LPIPS {name} has {} channels (shape {s:?}); it takes RGB or one channel (broadcast to RGB)",
            s[1]
        );
        ensure!(x.kind() == Kind::Float, "LPIPS {name} is {:?}; the network is float32", x.kind());
        ensure!(x.device() == self.device(), "LPIPS {name} is on {:?}, the network on {:?}", x.device(), self.device());
        Ok(())
    }

    /// The distance contributed by each tap, `(batch, 1, 1, 1)` each (lpips' `retPerLayer`).
    pub fn forward_layers(&self, in0: &Tensor, in1: &Tensor) -> Result<Vec<Tensor>> {
        self.check_input("in0", in0)?;
        self.check_input("in1", in1)?;
        let (s0, s1) = (in0.size(), in1.size());
        ensure!(s0[0] == s1[0] && s0[2..] == s1[2..], "LPIPS inputs differ in batch or spatial size: {s0:?} vs {s1:?}");
        let run = || -> Result<Vec<Tensor>> {
            let (t0, t1) = (self.taps(in0)?, self.taps(in1)?);
            let mut res = Vec::with_capacity(t0.len());
            for ((a, b), lin) in t0.iter().zip(&t1).zip(&self.lins) {
                let diff = unit_normalize(a)?.f_sub(&unit_normalize(b)?)?.f_pow_tensor_scalar(2)?;
                let weighted = diff.f_conv2d(lin, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)?;
                res.push(weighted.f_mean_dim(&[2i64, 3][..], true, None::<Kind>)?);
            }
            Ok(res)
        };
        run().with_context(|| format!("LPIPS {} on inputs of shape {s0:?} and {s1:?}", self.net))
    }

    /// LPIPS distance per image, `(batch, 1, 1, 1)`, with `normalize=False`: inputs are taken as they are (LPIPS
    /// expects [-1, 1]).
    pub fn forward(&self, in0: &Tensor, in1: &Tensor) -> Result<Tensor> {
        let layers = self.forward_layers(in0, in1)?;
        let mut total = layers[0].shallow_clone();
        for r in &layers[1..] {
            total = total.f_add(r)?;
        }
        Ok(total)
    }
}
