//! One step of the AutoencoderKL stage (reference-repo.md §3.5): the generator step (L1 + KL +
//! perceptual + adversarial, gradients clipped to norm 1, Adam), then, once the adversarial loss is
//! on, the discriminator step on the detached reconstruction and the real images (least-squares
//! patch loss, clipped to norm 1, Adam). The posterior noise is an argument: the step draws nothing.
//! Forward passes run under autocast at the chosen precision; each network has its own loss
//! scaler (disabled, hence the plain fp32 step, unless the precision is fp16).
use crate::amp::Precision;
use crate::losses::adversarial::PatchAdversarialLoss;
use crate::losses::kl::kl_loss;
use crate::losses::perceptual::PerceptualLoss;
use crate::nets::patch_discriminator::PatchDiscriminator;
use crate::nets::AutoencoderKL;
use crate::train::grad_scaler::GradScaler;
use crate::train::optim::Adam;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// The loss weights of the reference `stage1` config section.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AeklLossWeights {
    pub perceptual_weight: f64,
    pub kl_weight: f64,
    pub adv_weight: f64,
}

/// What the networks of the stage are.
pub struct AeklModels<'a> {
    pub autoencoder: &'a AutoencoderKL,
    pub discriminator: &'a PatchDiscriminator,
    /// `None` when `perceptual_weight` is 0 (no backbone needed then).
    pub perceptual: Option<&'a PerceptualLoss>,
    pub adversarial: &'a PatchAdversarialLoss,
}

/// The losses of one step (the unweighted terms, as the reference logs them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AeklLosses {
    pub loss: f64,
    pub l1: f64,
    pub p_loss: f64,
    pub kl: f64,
    pub g_adv: f64,
    /// The weighted discriminator loss (0 before the adversarial loss starts).
    pub d_loss: f64,
}

/// [`AeklLosses`] as 0-d tensors on the device (read them with [`AeklLossTensors::read`]; a training loop
/// reads them once per logging interval, not at every step).
pub struct AeklLossTensors {
    pub loss: Tensor,
    pub l1: Tensor,
    pub p_loss: Tensor,
    pub kl: Tensor,
    pub g_adv: Tensor,
    pub d_loss: Tensor,
}

impl AeklLossTensors {
    /// The terms by their logged names, `loss` first.
    pub fn named(&self) -> Vec<(&'static str, Tensor)> {
        [
            ("loss", &self.loss),
            ("l1", &self.l1),
            ("p_loss", &self.p_loss),
            ("kl", &self.kl),
            ("g_adv", &self.g_adv),
            ("d_loss", &self.d_loss),
        ]
        .into_iter()
        .map(|(k, t)| (k, t.detach()))
        .collect()
    }

    /// The values, in one copy to the host.
    pub fn read(&self) -> Result<AeklLosses> {
        let flat: Vec<Tensor> = self.named().iter().map(|(_, t)| t.to_kind(Kind::Double).reshape([1])).collect();
        let v =
            Vec::<f64>::try_from(Tensor::cat(&flat, 0).to_device(tch::Device::Cpu)).context("reading the losses")?;
        Ok(AeklLosses { loss: v[0], l1: v[1], p_loss: v[2], kl: v[3], g_adv: v[4], d_loss: v[5] })
    }
}

/// The optimisers of the stage and their loss scalers (the reference's `scaler_g`, `scaler_d`).
pub struct AeklOptimizers {
    pub g: Adam,
    pub d: Adam,
    pub scaler_g: GradScaler,
    pub scaler_d: GradScaler,
}

/// The generator's losses for `images` with posterior noise `eps`, in the network's train mode.
/// Returns the total (to back-propagate), the reconstruction and the logged terms.
fn generator_loss(
    m: &AeklModels,
    images: &Tensor,
    eps: &Tensor,
    w: &AeklLossWeights,
    adversarial: bool,
) -> Result<(Tensor, Tensor, AeklLossTensors)> {
    m.autoencoder.check_reconstructable(images, "a training batch")?;
    let (z_mu, z_sigma) = m.autoencoder.encode(images)?;
    let reconstruction = m.autoencoder.decode(&(&z_mu + eps * &z_sigma))?;
    // The reference's `.float()`s: the loss terms in float32 whatever autocast gave.
    let (rec32, images32) = (reconstruction.to_kind(Kind::Float), images.to_kind(Kind::Float));
    let l1 = rec32.l1_loss(&images32, Reduction::Mean);
    let p_loss = match m.perceptual {
        Some(p) => p.forward(&rec32, &images32)?,
        None => Tensor::zeros([], (tch::Kind::Float, images.device())),
    };
    // CUDA autocast runs the KL's pow, log and sums in float32 (CPU autocast would keep bf16/fp16): float32 here
    // on every device.
    let kl = kl_loss(&z_mu.to_kind(Kind::Float), &z_sigma.to_kind(Kind::Float));
    let g_adv = if adversarial {
        let logits = m.discriminator.logits(&rec32.contiguous(), true)?;
        m.adversarial.forward(&logits, true, false)
    } else {
        Tensor::zeros([], (tch::Kind::Float, images.device()))
    };
    let adv_w = if adversarial { w.adv_weight } else { 0.0 };
    let loss = &l1 + &kl * w.kl_weight + &p_loss * w.perceptual_weight + &g_adv * adv_w;
    let logged = AeklLossTensors {
        loss: loss.detach(),
        l1: l1.detach(),
        p_loss: p_loss.detach(),
        kl: kl.detach(),
        g_adv: g_adv.detach(),
        d_loss: Tensor::zeros([], (Kind::Float, images.device())),
    };
    Ok((loss, reconstruction, logged))
}

/// The generator step, then (when `adversarial`) the discriminator step, each as the reference:
/// forward under autocast, `scale(loss).backward()`, `unscale_`, clip to norm 1, `step`, `update`.
pub fn aekl_step(
    m: &AeklModels,
    o: &mut AeklOptimizers,
    precision: Precision,
    images: &Tensor,
    eps: &Tensor,
    w: &AeklLossWeights,
    adversarial: bool,
) -> Result<AeklLossTensors> {
    let device = images.device();
    o.g.zero_grad();
    let (loss, reconstruction, mut logged) = {
        let _autocast = precision.autocast(device);
        generator_loss(m, images, eps, w, adversarial)?
    };
    crate::distributed::backward(&o.scaler_g.scale(&loss)?, &o.g)?;
    o.scaler_g.unscale_(&mut o.g)?;
    let _total_norm = o.g.clip_grad_norm(1.0)?;
    o.scaler_g.step(&mut o.g)?;
    o.scaler_g.update()?;
    if adversarial {
        // The generator's adversarial term also reached the discriminator's gradients: cleared here.
        o.d.zero_grad();
        let d_loss = {
            let _autocast = precision.autocast(device);
            let fake = m.discriminator.logits(&reconstruction.detach().contiguous(), true)?;
            let loss_fake = m.adversarial.forward(&fake, false, true);
            let real = m.discriminator.logits(&images.detach().contiguous(), true)?;
            let loss_real = m.adversarial.forward(&real, true, true);
            (loss_fake + loss_real) * 0.5 * w.adv_weight
        };
        crate::distributed::backward(&o.scaler_d.scale(&d_loss)?, &o.d)?;
        o.scaler_d.unscale_(&mut o.d)?;
        let _total_norm = o.d.clip_grad_norm(1.0)?;
        o.scaler_d.step(&mut o.d)?;
        o.scaler_d.update()?;
        logged.d_loss = d_loss.detach();
    }
    Ok(logged)
}

/// The validation losses of a batch (no gradients, networks in eval mode, posterior noise given).
pub fn aekl_eval(
    m: &AeklModels,
    precision: Precision,
    images: &Tensor,
    eps: &Tensor,
    w: &AeklLossWeights,
) -> Result<AeklLossTensors> {
    let _guard = tch::no_grad_guard();
    let _autocast = precision.autocast(images.device());
    Ok(generator_loss(m, images, eps, w, false)?.2)
}
