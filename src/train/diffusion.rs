//! The LDM and ControlNet training objective (reference-repo.md §3.6-3.7): noise the latent at
//! uniform timesteps, predict with the UNet (after the ControlNet, when training one), and take the
//! mean squared error to the target of the prediction type (`v`: `get_velocity(x0, noise, t)`).
//! The random draws (timesteps, noise) are arguments, so a step is a pure function of its inputs.
use crate::amp::Precision;
use crate::nets::{Conditioning, ControlNet, DiffusionModelUNet};
use crate::schedulers::{NoiseSchedule, PredictionType};
use crate::train::grad_scaler::GradScaler;
use crate::train::optim::Adam;
use anyhow::Result;
use tch::{Kind, Reduction, Tensor};

/// The ControlNet being trained and its control image (the FLAIR slice at full resolution).
pub struct ControlInput<'a> {
    pub controlnet: &'a ControlNet,
    pub cond: &'a Tensor,
}

/// The loss of one batch. `latent` is the scaled posterior sample (`encode_stage_2_inputs * scale_factor`),
/// `timesteps` int64 `(batch,)`, `context` the prompt embeddings (rows already replaced by the null
/// prompt where the batch drops them).
// The step's inputs, named as the reference names them; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn diffusion_loss(
    unet: &DiffusionModelUNet,
    control: Option<&ControlInput>,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    latent: &Tensor,
    noise: &Tensor,
    timesteps: &Tensor,
    context: Option<&Tensor>,
) -> Result<Tensor> {
    let noisy = schedule.add_noise(latent, noise, timesteps)?;
    let pred = match control {
        Some(c) => {
            let cond = Conditioning { context, ..Default::default() };
            let res = c.controlnet.forward(&noisy, timesteps, c.cond, 1.0, &cond)?;
            unet.forward_t(&noisy, timesteps, &res.conditioning(context, None), true)?
        }
        None => unet.forward_t(&noisy, timesteps, &Conditioning { context, ..Default::default() }, true)?,
    };
    let target = match prediction {
        PredictionType::Epsilon => noise.shallow_clone(),
        PredictionType::VPrediction => schedule.get_velocity(latent, noise, timesteps)?,
        PredictionType::Sample => latent.shallow_clone(),
    };
    // The reference's `F.mse_loss(noise_pred.float(), target.float())`.
    Ok(pred.to_kind(Kind::Float).mse_loss(&target.to_kind(Kind::Float), Reduction::Mean))
}

/// One optimiser step as the reference takes it: the loss under autocast, `scaler.scale(loss)
/// .backward()`, `scaler.step(opt)`, `scaler.update()` (no unscaling, no clipping). Returns the loss.
/// In a data-parallel job the gradients are averaged over the processes after the backward pass.
pub fn diffusion_step(
    opt: &mut Adam,
    scaler: &mut GradScaler,
    precision: Precision,
    device: tch::Device,
    loss: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    opt.zero_grad();
    let loss = {
        let _autocast = precision.autocast(device);
        loss()?
    };
    crate::distributed::backward(&scaler.scale(&loss)?, opt)?;
    scaler.step(opt)?;
    scaler.update()?;
    Ok(loss)
}
