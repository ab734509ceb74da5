//! The RadImageNet ResNet50 feature network of the reference's FID (reference-repo.md §5.2), as the torch.hub
//! repository `Warvito/radimagenet-models` defines it (`radimagenet_models/models/resnet.py`, `ResNet50`): a port of
//! Keras' ResNet50 without its top. Unlike torchvision's ResNet50 every conv has a bias, the stride of a bottleneck
//! sits in its first 1x1 conv, and every BatchNorm has eps 1.001e-5. The forward pass ends at `layer4` (no pooling
//! and no classifier), 2048 channels at 1/32 of the input size.
//!
//! There is no random initialisation: every weight comes from the user's `RadImageNet-ResNet50_notop.pth` (the file
//! the hub downloads from Google Drive into `$TORCH_HOME/hub/checkpoints/`), loaded strictly. Its keys are the hub
//! model's `state_dict()` names, which the fields below reproduce: `conv1.*`, `bn1.*`, `layer{1..4}.{i}.conv{1,2,3}.*`,
//! `layer{1..4}.{i}.bn{1,2,3}.*` and `layer{1..4}.0.downsample.{0,1}.*`, BatchNorms with `running_mean`,
//! `running_var` and `num_batches_tracked`.
use crate::checkpoint::{load_model, Loaded, StateDict};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn;
use tch::{Device, Kind, Tensor};

/// The file name the hub gives the weights (`radimagenet_resnet50(file_name=...)`).
pub const CHECKPOINT_FILE: &str = "RadImageNet-ResNet50_notop.pth";

/// The reference's mean subtraction, per channel of the BGR image it feeds the network: channel 0 (blue, taken from
/// the input's channel 2) minus 0.406, channel 1 minus 0.456, channel 2 (red) minus 0.485. There is no division by a
/// standard deviation.
pub const BGR_MEAN: [f32; 3] = [0.406, 0.456, 0.485];

/// The architecture. Only the reference network (Keras' ResNet50) exists as weights; the fields are there so that
/// a state dict's shapes are checked against something explicit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RadImageNetResNet50Config {
    /// Input channels of `conv1` (the network takes BGR images).
    #[serde(default = "three")]
    pub in_channels: i64,
    /// Bottlenecks per stage (`layer1`..`layer4`).
    #[serde(default = "default_layers")]
    pub layers: [i64; 4],
    /// BatchNorm epsilon (Keras' 1.001e-5).
    #[serde(default = "default_eps")]
    pub bn_eps: f64,
}

fn three() -> i64 {
    3
}
fn default_layers() -> [i64; 4] {
    [3, 4, 6, 3]
}
fn default_eps() -> f64 {
    1.001e-5
}

impl Default for RadImageNetResNet50Config {
    fn default() -> Self {
        Self::reference()
    }
}

impl RadImageNetResNet50Config {
    /// ResNet50: 3 input channels, [3, 4, 6, 3] bottlenecks, eps 1.001e-5.
    pub fn reference() -> Self {
        Self { in_channels: three(), layers: default_layers(), bn_eps: default_eps() }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.in_channels > 0, "RadImageNet ResNet50: in_channels must be positive, got {}", self.in_channels);
        ensure!(
            self.layers.iter().all(|&n| n > 0),
            "RadImageNet ResNet50: every stage needs at least one bottleneck, got {:?}",
            self.layers
        );
        ensure!(self.bn_eps > 0.0, "RadImageNet ResNet50: bn_eps must be positive, got {}", self.bn_eps);
        Ok(())
    }

    /// Channels of the output (`layer4`): 512 * 4.
    pub fn out_channels(&self) -> i64 {
        512 * EXPANSION
    }
}

/// Output channels of a bottleneck over its width (`Bottleneck.expansion`).
const EXPANSION: i64 = 4;

/// `nn.Conv2d(bias=True)`, weights from a checkpoint only.
#[derive(Debug)]
struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
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

/// `nn.BatchNorm2d` in eval mode (running statistics). `num_batches_tracked` is kept (int64) because the hub's
/// state dict has it; the momentum (0.99 or 0.01 there) never matters in eval mode.
#[derive(Debug)]
struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    _num_batches_tracked: Tensor,
    eps: f64,
}

impl BatchNorm2d {
    fn new(p: &nn::Path, c: i64, eps: f64) -> Self {
        Self {
            weight: p.ones_no_train("weight", &[c]),
            bias: p.zeros_no_train("bias", &[c]),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
            _num_batches_tracked: p.add(
                "num_batches_tracked",
                Tensor::zeros([0i64; 0], (Kind::Int64, p.device())),
                false,
            ),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.0,
            self.eps,
            true,
        )?)
    }
}

/// `downsample = nn.Sequential(conv1x1(inplanes, planes * 4, stride), BatchNorm2d)`: keys `downsample.0.*` and
/// `downsample.1.*`.
#[derive(Debug)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

/// The Keras bottleneck: 1x1 (strided) -> 3x3 -> 1x1, each followed by BatchNorm, ReLU after the first two and after
/// the residual sum.
#[derive(Debug)]
struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    downsample: Option<Downsample>,
}

impl Bottleneck {
    fn new(p: &nn::Path, inplanes: i64, planes: i64, stride: i64, eps: f64) -> Self {
        let out = planes * EXPANSION;
        let downsample = (stride != 1 || inplanes != out).then(|| {
            let d = p / "downsample";
            Downsample {
                conv: Conv2d::new(&(&d / 0), inplanes, out, 1, stride, 0),
                bn: BatchNorm2d::new(&(&d / 1), out, eps),
            }
        });
        Self {
            conv1: Conv2d::new(&(p / "conv1"), inplanes, planes, 1, stride, 0),
            bn1: BatchNorm2d::new(&(p / "bn1"), planes, eps),
            conv2: Conv2d::new(&(p / "conv2"), planes, planes, 3, 1, 1),
            bn2: BatchNorm2d::new(&(p / "bn2"), planes, eps),
            conv3: Conv2d::new(&(p / "conv3"), planes, out, 1, 1, 0),
            bn3: BatchNorm2d::new(&(p / "bn3"), out, eps),
            downsample,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.bn1.forward(&self.conv1.forward(x)?)?.f_relu()?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?)?.f_relu()?;
        let h = self.bn3.forward(&self.conv3.forward(&h)?)?;
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(&d.conv.forward(x)?)?,
            None => x.shallow_clone(),
        };
        Ok(h.f_add(&identity)?.f_relu()?)
    }
}

/// The hub's `ResNet50`: `conv1` (7x7, stride 2, padding 3) -> `bn1` -> ReLU -> max pool (3, stride 2, padding 1)
/// -> `layer1`..`layer4`. Frozen: no variable is trainable.
#[derive(Debug)]
pub struct RadImageNetResNet50 {
    cfg: RadImageNetResNet50Config,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layer1: Vec<Bottleneck>,
    layer2: Vec<Bottleneck>,
    layer3: Vec<Bottleneck>,
    layer4: Vec<Bottleneck>,
}

impl RadImageNetResNet50 {
    /// The network with placeholder weights (zeros; BatchNorm scales and variances ones), to be loaded.
    pub fn new(p: &nn::Path, cfg: &RadImageNetResNet50Config) -> Result<Self> {
        cfg.validate()?;
        let eps = cfg.bn_eps;
        let mut inplanes = 64;
        let mut stage = |name: &str, planes: i64, blocks: i64, stride: i64| -> Vec<Bottleneck> {
            let sp = p / name;
            (0..blocks)
                .map(|i| {
                    let b = Bottleneck::new(&(&sp / i), inplanes, planes, if i == 0 { stride } else { 1 }, eps);
                    inplanes = planes * EXPANSION;
                    b
                })
                .collect()
        };
        let [n1, n2, n3, n4] = cfg.layers;
        let layer1 = stage("layer1", 64, n1, 1);
        let layer2 = stage("layer2", 128, n2, 2);
        let layer3 = stage("layer3", 256, n3, 2);
        let layer4 = stage("layer4", 512, n4, 2);
        Ok(Self {
            cfg: cfg.clone(),
            conv1: Conv2d::new(&(p / "conv1"), cfg.in_channels, 64, 7, 2, 3),
            bn1: BatchNorm2d::new(&(p / "bn1"), 64, eps),
            layer1,
            layer2,
            layer3,
            layer4,
        })
    }

    pub fn config(&self) -> &RadImageNetResNet50Config {
        &self.cfg
    }

    /// Loads a state dict (the hub's `RadImageNet-ResNet50_notop.pth` read with [`StateDict::load`], or a medgen
    /// conversion of it) strictly into the reference network: any missing, unexpected or mis-shaped key is an error
    /// naming the key and both shapes.
    pub fn from_state_dict(sd: StateDict, device: Device) -> Result<Loaded<Self>> {
        let cfg = RadImageNetResNet50Config::reference();
        load_model(sd, device, |p, _| Self::new(p, &cfg))
            .context("the checkpoint is not the RadImageNet ResNet50 of Warvito/radimagenet-models")
    }

    /// Reads and loads `RadImageNet-ResNet50_notop.pth` (torch.save, zip or legacy) or its safetensors conversion.
    pub fn load(weights: &Path, device: Device) -> Result<Loaded<Self>> {
        let sd = StateDict::load(weights, None)
            .with_context(|| format!("reading the RadImageNet ResNet50 weights {}", weights.display()))?;
        Self::from_state_dict(sd, device).with_context(|| format!("loading {}", weights.display()))
    }

    /// The `layer4` feature map of a (batch, 3, H, W) BGR float image, (batch, 2048, ceil(H/32), ceil(W/32)). Gradients flow to the input if it requires them.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ensure!(
            x.dim() == 4 && x.size()[1] == self.cfg.in_channels,
            "RadImageNet ResNet50: input of shape {:?}, expected (batch, {}, H, W)",
            x.size(),
            self.cfg.in_channels
        );
        let h = self.bn1.forward(&self.conv1.forward(x)?)?.f_relu()?;
        let mut h = h.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for (name, stage) in
            [("layer1", &self.layer1), ("layer2", &self.layer2), ("layer3", &self.layer3), ("layer4", &self.layer4)]
        {
            for (i, b) in stage.iter().enumerate() {
                h = b.forward(&h).with_context(|| format!("RadImageNet ResNet50 {name}.{i} on {:?}", h.size()))?;
            }
        }
        Ok(h)
    }
}

/// The reference's preprocessing (`compute_fid.py`): a (batch, 1, H, W) image in [0, 1] is repeated to 3 channels,
/// put in BGR order (`image[:, [2, 1, 0]]`) and the per-channel means [`BGR_MEAN`] are subtracted, with no division
/// by a standard deviation. Float32 on the input's device.
pub fn radimagenet_preprocess(images: &Tensor) -> Result<Tensor> {
    ensure!(
        images.dim() == 4 && images.size()[1] == 1,
        "RadImageNet features: images of shape {:?}, expected (batch, 1, H, W) in [0, 1]",
        images.size()
    );
    let device = images.device();
    let x = images.f_to_kind(Kind::Float)?.f_repeat([1, 3, 1, 1])?;
    let bgr = Tensor::f_from_slice(&[2i64, 1, 0])?.f_to_device(device)?;
    let x = x.f_index_select(1, &bgr)?;
    let mean = Tensor::f_from_slice(&BGR_MEAN)?.f_to_device(device)?.f_view([1, 3, 1, 1])?;
    Ok(x.f_sub(&mean)?)
}

/// The reference's FID features: [`radimagenet_preprocess`], the network, and the spatial mean of its `layer4` map,
/// (batch, 2048) float32 on the network's device. Runs under `no_grad`.
pub fn radimagenet_features(net: &RadImageNetResNet50, images: &Tensor) -> Result<Tensor> {
    let device = net.conv1.weight.device();
    tch::no_grad(|| -> Result<Tensor> {
        let x = radimagenet_preprocess(&images.f_to_device(device)?)?;
        Ok(net.forward(&x)?.f_mean_dim(&[2i64, 3][..], false, None::<Kind>)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_shapes_and_output_size() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = RadImageNetResNet50::new(&vs.root(), &RadImageNetResNet50Config::reference()).unwrap();
        let vars = vs.variables();
        // 53 convs (weight, bias) and 53 BatchNorms (5 entries each).
        assert_eq!(vars.len(), 53 * 2 + 53 * 5);
        assert!(vs.trainable_variables().is_empty());
        let shape = |k: &str| vars.get(k).unwrap_or_else(|| panic!("no variable {k}")).size();
        assert_eq!(shape("conv1.weight"), [64, 3, 7, 7]);
        assert_eq!(shape("layer1.0.conv1.weight"), [64, 64, 1, 1]);
        assert_eq!(shape("layer1.0.downsample.0.weight"), [256, 64, 1, 1]);
        assert_eq!(shape("layer2.0.conv1.weight"), [128, 256, 1, 1]);
        assert_eq!(shape("layer3.5.conv2.weight"), [256, 256, 3, 3]);
        assert_eq!(shape("layer4.2.bn3.running_var"), [2048]);
        assert_eq!(vars["layer4.0.downsample.1.num_batches_tracked"].kind(), Kind::Int64);
        assert!(!vars.contains_key("layer1.1.downsample.0.weight"));
        let params: i64 = vars.values().filter(|t| t.kind() == Kind::Float).map(|t| t.numel() as i64).sum();
        // Keras' ResNet50 without top: 23,587,712 parameters, the BatchNorms' 53,120 moving statistics included.
        assert_eq!(params, 23_587_712);
        let x = Tensor::zeros([2, 1, 64, 96], (Kind::Float, Device::Cpu));
        assert_eq!(radimagenet_features(&net, &x).unwrap().size(), [2, 2048]);
        assert_eq!(net.forward(&x.repeat([1, 3, 1, 1])).unwrap().size(), [2, 2048, 2, 3]);
        assert!(format!("{:#}", radimagenet_features(&net, &x.repeat([1, 3, 1, 1])).unwrap_err())
            .contains("[2, 3, 64, 96]"));
    }
}
