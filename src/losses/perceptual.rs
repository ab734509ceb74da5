//! `monai.losses.PerceptualLoss(spatial_dims=2, network_type="alex" | "vgg" | "squeeze")` as MONAI 1.6.1 computes
//! it: `mean(lpips(input, target))` over the batch, with lpips' default `normalize=False`. Two behaviours of the
//! original are kept on purpose, since the reference training used them:
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
        Self { spatial_dims: 2, network_type: LpipsNet::Alex, lin_weights: None, backbone_weights: None }
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
}

impl PerceptualLoss {
    /// Loads the network the config names. A missing backbone is an error (never a random trunk).
    pub fn new(cfg: &PerceptualLossConfig, device: Device) -> Result<Self> {
        if cfg.spatial_dims != 2 {
            bail!(
                "perceptual loss: spatial_dims {} is not supported; only the 2-D LPIPS path (spatial_dims 2) is",
                cfg.spatial_dims
            );
        }
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
        Ok(Self { lpips })
    }

    pub fn from_lpips(lpips: Lpips) -> Self {
        Self { lpips }
    }

    pub fn lpips(&self) -> &Lpips {
        &self.lpips
    }

    /// Scalar loss: LPIPS per image, averaged over the batch. `input` and `target` are (B, 1 or 3, H, W) float32.
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        let (si, st) = (input.size(), target.size());
        ensure!(si == st, "perceptual loss: ground truth has differing shape ({st:?}) from input ({si:?})");
        ensure!(si.len() == 4, "perceptual loss (spatial_dims 2) takes (batch, channels, H, W), got shape {si:?}");
        Ok(self.lpips.forward(input, target)?.f_mean(None::<Kind>)?)
    }
}
