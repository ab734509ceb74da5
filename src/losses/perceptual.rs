//! `monai.losses.PerceptualLoss(spatial_dims=2, network_type="alex" | "vgg" | "squeeze")` as MONAI 1.6.1 computes
//! it: `mean(lpips(input, target))` over the batch, with lpips' default `normalize=False`; for volumes
//! (`spatial_dims=3`) its 2.5-D mode (`is_fake_3d`, MONAI's default): the same 2-D LPIPS on a random
//! `fake_3d_ratio` of the slices along each of the three axes, the three means summed. MONAI's real 3-D mode needs
//! its MedicalNet backbones, which do not ship offline, and is refused. Two behaviours of the original are kept on
//! purpose, since the reference training used them:
//! - no rescale to [-1, 1]: the [0, 1] images of the reference go in as they are;
//! - one-channel images are not repeated explicitly; LPIPS's scaling broadcasts them to three channels (the same
//!   values as repeating).
use crate::nets::lpips::{wheel_lin_weights, Lpips, LpipsNet};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The error for a perceptual loss without an ImageNet trunk.
pub const MISSING_BACKBONE: &str =
    "no ImageNet backbone ships offline; give backbone_weights or set perceptual_weight: 0";

fn two() -> i64 {
    2
}

fn yes() -> bool {
    true
}

fn half() -> f64 {
    0.5
}

fn alex() -> LpipsNet {
    // MONAI's default `network_type`.
    LpipsNet::Alex
}

/// MONAI's constructor arguments for the 2-D LPIPS path (the reference config's `perceptual_network.params` reads
/// as it is), plus where the weights are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerceptualLossConfig {
    #[serde(default = "two")]
    pub spatial_dims: i64,
    #[serde(default = "alex")]
    pub network_type: LpipsNet,
    /// Volumes: the 2.5-D loss over slices (MONAI's default and the only 3-D mode medgen has).
    #[serde(default = "yes")]
    pub is_fake_3d: bool,
    /// Volumes: the fraction of each axis' slices (over the whole batch) the 2.5-D loss draws.
    #[serde(default = "half")]
    pub fake_3d_ratio: f64,
    /// The lpips wheel's `lpips/weights/v0.1/<network_type>.pth` unless given otherwise; see
    /// [`PerceptualLossConfig::with_wheel_lin_weights`].
    #[serde(default)]
    pub lin_weights: Option<PathBuf>,
    /// torchvision's ImageNet checkpoint for the trunk (`LpipsNet::torchvision_file`), or a saved
    /// `lpips.LPIPS` / MONAI `PerceptualLoss` state dict. Required: none ships offline.
    #[serde(default)]
    pub backbone_weights: Option<PathBuf>,
}

impl Default for PerceptualLossConfig {
    fn default() -> Self {
        Self {
            spatial_dims: 2,
            network_type: LpipsNet::Alex,
            is_fake_3d: true,
            fake_3d_ratio: 0.5,
            lin_weights: None,
            backbone_weights: None,
        }
    }
}

impl PerceptualLossConfig {
    pub fn new(network_type: LpipsNet) -> Self {
        Self { network_type, ..Self::default() }
    }

    /// Fills `lin_weights`, when unset, with the lpips wheel's file in the Python environment `venv`.
    pub fn with_wheel_lin_weights(mut self, venv: &Path) -> Result<Self> {
        if self.lin_weights.is_none() {
            self.lin_weights = Some(wheel_lin_weights(venv, self.network_type)?);
        }
        Ok(self)
    }
}

/// The perceptual loss. Its network is frozen; the loss is differentiable w.r.t. `input` (and `target`).
#[derive(Debug)]
pub struct PerceptualLoss {
    lpips: Lpips,
    /// `Some(fake_3d_ratio)` for volumes.
    fake_3d: Option<f64>,
}

impl PerceptualLoss {
    /// Loads the network the config names. A missing backbone is an error (never a random trunk).
    pub fn new(cfg: &PerceptualLossConfig, device: Device) -> Result<Self> {
        let fake_3d = match (cfg.spatial_dims, cfg.is_fake_3d) {
            (2, _) => None,
            (3, true) => {
                ensure!(
                    cfg.fake_3d_ratio > 0.0 && cfg.fake_3d_ratio <= 1.0,
                    "perceptual loss: fake_3d_ratio must be in (0, 1], got {}",
                    cfg.fake_3d_ratio
                );
                Some(cfg.fake_3d_ratio)
            }
            (3, false) => bail!(
                "perceptual loss: spatial_dims 3 with is_fake_3d false needs MONAI's MedicalNet 3-D backbones, which \
                 medgen does not have; use is_fake_3d true (the 2.5-D loss over slices, MONAI's default)"
            ),
            (d, _) => bail!("perceptual loss: spatial_dims must be 2 or 3, got {d}"),
        };
        let net = cfg.network_type;
        let Some(backbone) = &cfg.backbone_weights else {
            bail!("perceptual loss ({net}): {MISSING_BACKBONE} (torchvision's {})", net.torchvision_file());
        };
        let Some(lin) = &cfg.lin_weights else {
            bail!(
                "perceptual loss ({net}): lin_weights not given; they ship in the lpips wheel as lpips/{}",
                net.wheel_lin_file()
            );
        };
        let lpips = Lpips::load(net, lin, backbone, device).context("building the perceptual loss")?;
        Ok(Self { lpips, fake_3d })
    }

    pub fn from_lpips(lpips: Lpips) -> Self {
        Self { lpips, fake_3d: None }
    }

    pub fn lpips(&self) -> &Lpips {
        &self.lpips
    }

    /// Scalar loss: LPIPS per image, averaged over the batch. `input` and `target` are (B, 1 or 3, H, W) float32,
    /// or (B, C, H, W, D) volumes for the 2.5-D loss, whose slice draws come from libtorch's global generator as
    /// MONAI's `torch.randperm` does (same seed, same slices).
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        let (si, st) = (input.size(), target.size());
        ensure!(si == st, "perceptual loss: ground truth has differing shape ({st:?}) from input ({si:?})");
        let Some(ratio) = self.fake_3d else {
            ensure!(si.len() == 4, "perceptual loss (spatial_dims 2) takes (batch, channels, H, W), got shape {si:?}");
            return Ok(self.lpips.forward(input, target)?.f_mean(None::<Kind>)?);
        };
        ensure!(si.len() == 5, "perceptual loss (spatial_dims 3) takes (batch, channels, H, W, D), got shape {si:?}");
        // MONAI's order: sagittal (axis 2), coronal (3), axial (4), each drawing its slices in turn; summed as
        // `sagittal + axial + coronal`.
        let sagittal = self.axis_loss(input, target, 2, ratio)?;
        let coronal = self.axis_loss(input, target, 3, ratio)?;
        let axial = self.axis_loss(input, target, 4, ratio)?;
        Ok((sagittal + axial + coronal).f_mean(None::<Kind>)?)
    }

    /// MONAI's `_calculate_axis_loss`: the slices along `axis` of every volume as one batch of 2-D images
    /// `(B * n, C, ., .)`, a random `ratio` of them, LPIPS averaged.
    fn axis_loss(&self, input: &Tensor, target: &Tensor, axis: i64, ratio: f64) -> Result<Tensor> {
        let keep: Vec<i64> = [2, 3, 4].into_iter().filter(|&a| a != axis).collect();
        let perm = [0, axis, 1, keep[0], keep[1]];
        let s = input.size();
        let batchify = |x: &Tensor| -> Result<Tensor> {
            Ok(x.f_to_kind(Kind::Float)?.f_permute(perm)?.f_contiguous()?.f_view([
                -1,
                s[1],
                s[keep[0] as usize],
                s[keep[1] as usize],
            ])?)
        };
        let slices = batchify(input)?;
        let n = slices.size()[0];
        let indices = Tensor::f_randperm(n, (Kind::Int64, Device::Cpu))?
            .f_narrow(0, 0, (n as f64 * ratio) as i64)?
            .f_to_device(input.device())?;
        ensure!(indices.size()[0] > 0, "perceptual loss: fake_3d_ratio {ratio} of {n} slices keeps none");
        let a = slices.f_index_select(0, &indices)?;
        let b = batchify(target)?.f_index_select(0, &indices)?;
        Ok(self.lpips.forward(&a, &b)?.f_mean(None::<Kind>)?)
    }
}
