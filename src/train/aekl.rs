//! One step of the AutoencoderKL stage (reference-repo.md §3.5): the generator step (L1 + KL +
//! perceptual + adversarial, gradients clipped to norm 1, Adam), then, once the adversarial loss is
//! on, the discriminator step on the detached reconstruction and the real images (least-squares
//! patch loss, clipped to norm 1, Adam). The posterior noise is an argument: the step draws nothing.
use crate::losses::adversarial::PatchAdversarialLoss;
use crate::losses::kl::kl_loss;
use crate::losses::perceptual::PerceptualLoss;
use crate::nets::patch_discriminator::PatchDiscriminator;
use crate::nets::AutoencoderKL;
use crate::train::optim::Adam;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};

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

fn scalar(t: &Tensor) -> Result<f64> {
    f64::try_from(t).context("reading a loss value")
}

/// The generator's losses for `images` with posterior noise `eps`, in the network's train mode.
/// Returns the total (to back-propagate), the reconstruction and the logged terms.
fn generator_loss(
    m: &AeklModels,
    images: &Tensor,
    eps: &Tensor,
    w: &AeklLossWeights,
    adversarial: bool,
) -> Result<(Tensor, Tensor, AeklLosses)> {
    let (z_mu, z_sigma) = m.autoencoder.encode(images)?;
    let reconstruction = m.autoencoder.decode(&(&z_mu + eps * &z_sigma))?;
    let l1 = reconstruction.l1_loss(images, Reduction::Mean);
    let p_loss = match m.perceptual {
        Some(p) => p.forward(&reconstruction, images)?,
        None => Tensor::zeros([], (tch::Kind::Float, images.device())),
    };
    let kl = kl_loss(&z_mu, &z_sigma);
    let g_adv = if adversarial {
        let logits = m.discriminator.logits(&reconstruction.contiguous(), true)?;
        m.adversarial.forward(&logits, true, false)
    } else {
        Tensor::zeros([], (tch::Kind::Float, images.device()))
    };
    let adv_w = if adversarial { w.adv_weight } else { 0.0 };
    let loss = &l1 + &kl * w.kl_weight + &p_loss * w.perceptual_weight + &g_adv * adv_w;
    let logged = AeklLosses {
        loss: scalar(&loss)?,
        l1: scalar(&l1)?,
        p_loss: scalar(&p_loss)?,
        kl: scalar(&kl)?,
        g_adv: scalar(&g_adv)?,
        d_loss: 0.0,
    };
    Ok((loss, reconstruction, logged))
}

/// The generator step, then (when `adversarial`) the discriminator step.
pub fn aekl_step(
    m: &AeklModels,
    opt_g: &mut Adam,
    opt_d: &mut Adam,
    images: &Tensor,
    eps: &Tensor,
    w: &AeklLossWeights,
    adversarial: bool,
) -> Result<AeklLosses> {
    opt_g.zero_grad();
    let (loss, reconstruction, mut logged) = generator_loss(m, images, eps, w, adversarial)?;
    loss.backward();
    let _total_norm = opt_g.clip_grad_norm(1.0)?;
    opt_g.step()?;
    if adversarial {
        // The generator's adversarial term also reached the discriminator's gradients: cleared here.
        opt_d.zero_grad();
        let fake = m.discriminator.logits(&reconstruction.detach().contiguous(), true)?;
        let loss_fake = m.adversarial.forward(&fake, false, true);
        let real = m.discriminator.logits(&images.detach().contiguous(), true)?;
        let loss_real = m.adversarial.forward(&real, true, true);
        let d_loss = (loss_fake + loss_real) * 0.5 * w.adv_weight;
        d_loss.backward();
        let _total_norm = opt_d.clip_grad_norm(1.0)?;
        opt_d.step()?;
        logged.d_loss = scalar(&d_loss)?;
    }
    Ok(logged)
}

/// The validation losses of a batch (no gradients, networks in eval mode, posterior noise given).
pub fn aekl_eval(m: &AeklModels, images: &Tensor, eps: &Tensor, w: &AeklLossWeights) -> Result<AeklLosses> {
    let _guard = tch::no_grad_guard();
    Ok(generator_loss(m, images, eps, w, false)?.2)
}
