//! Sampling loops: latent diffusion, and ControlNet latent diffusion, as the reference scripts
//! `sample_t1w.py` and `sample_flair_to_t1w.py` run them (and MONAI's latent inferers without
//! guidance). The networks and the scheduler are passed in; nothing here reads files.
//!
//! Per step, exactly as the reference: the latent is duplicated, the UNet (after the ControlNet)
//! runs once on the `[uncond, cond]` batch with `timesteps = [t]` (one int64 timestep broadcast
//! over the batch), the output is split in two halves and combined as
//! `uncond + guidance_scale * (cond - uncond)`, then `scheduler.step`. The final latent is
//! divided by `scale_factor` and decoded with `decode_stage_2_outputs`.
use crate::amp::Precision;
use crate::nets::{AutoencoderKL, Conditioning, ControlNet, DiffusionModelUNet};
use crate::schedulers::Scheduler;
use crate::sliding_window::{sliding_window_inference, SlidingWindowConfig};
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// The initial noise of a sample: `torch.manual_seed(seed); torch.randn(shape)` on the CPU
/// generator (as the reference draws it, whatever the device), then moved to `device`.
pub fn initial_noise(shape: &[i64], seed: i64, device: Device) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(device)
}

/// What the UNet is conditioned on.
#[derive(Clone, Copy)]
pub enum TextConditioning<'a> {
    /// An unconditioned UNet (no cross-attention).
    None,
    /// One context for every sample: `(1 or batch, tokens, dim)`.
    Context(&'a Tensor),
    /// Classifier-free guidance on the batched `[uncond, cond]` pair; each `(1 or batch, tokens, dim)`.
    /// A scale of 0 gives the unconditional prediction (the reference's unconditioned samples
    /// still run the conditional half, as here).
    Guided { uncond: &'a Tensor, cond: &'a Tensor, guidance_scale: f64 },
}

/// The ControlNet and its input for ControlNet sampling.
#[derive(Clone, Copy)]
pub struct Control<'a> {
    pub controlnet: &'a ControlNet,
    /// The control image at the resolution the ControlNet's embedding expects (the reference
    /// feeds the full-resolution FLAIR slice), `(batch, channels, H, W)`.
    pub cond: &'a Tensor,
    pub conditioning_scale: f64,
}

fn expand_batch(t: &Tensor, batch: i64, what: &str) -> Result<Tensor> {
    let s = t.size();
    ensure!(s.len() == 3, "{what} must be (batch, tokens, dim), got shape {s:?}");
    ensure!(s[0] == 1 || s[0] == batch, "{what} has batch {} for {batch} samples", s[0]);
    Ok(t.expand([batch, s[1], s[2]], false))
}

/// The ControlNet input prepared once per batch: the control image through the ControlNet's
/// conditioning embedding (~12 % of a guided step at the reference configs), at the batch the
/// networks see (doubled under guidance). Embedding `cat([c, c])` rather than `c` keeps every
/// step bit-identical to the reference loop, which embeds that doubled batch at every step.
struct PreparedControl<'a> {
    controlnet: &'a ControlNet,
    embedded: Tensor,
    conditioning_scale: f64,
}

impl<'a> PreparedControl<'a> {
    fn new(c: &Control<'a>, latent: &Tensor, text: &TextConditioning, precision: Precision) -> Result<Self> {
        c.controlnet.check_cond(latent, c.cond)?;
        let guided = matches!(text, TextConditioning::Guided { .. });
        let cond = if guided { Tensor::cat(&[c.cond, c.cond], 0) } else { c.cond.shallow_clone() };
        let _autocast = precision.autocast(latent.device());
        Ok(Self {
            controlnet: c.controlnet,
            embedded: c.controlnet.embed_condition(&cond)?,
            conditioning_scale: c.conditioning_scale,
        })
    }
}

/// One model evaluation for the latent `x` at `timesteps` (`[t]`, on `x`'s device), guidance
/// applied. The networks run under `precision`'s autocast; their output is cast back to float32
/// so that guidance and the scheduler work in float32.
fn predict(
    unet: &DiffusionModelUNet,
    control: Option<&PreparedControl>,
    x: &Tensor,
    timesteps: &Tensor,
    text: &TextConditioning,
    precision: Precision,
) -> Result<Tensor> {
    let batch = x.size()[0];
    let (model_input, context, guidance) = match text {
        TextConditioning::None => (x.shallow_clone(), None, None),
        TextConditioning::Context(c) => (x.shallow_clone(), Some(expand_batch(c, batch, "context")?), None),
        TextConditioning::Guided { uncond, cond, guidance_scale } => {
            let context = Tensor::cat(
                &[expand_batch(uncond, batch, "unconditional context")?, expand_batch(cond, batch, "context")?],
                0,
            );
            (Tensor::cat(&[x, x], 0), Some(context), Some(*guidance_scale))
        }
    };
    let output = {
        let _autocast = precision.autocast(x.device());
        match control {
            Some(c) => {
                // CFG is on the text only: both halves got the same control image.
                let cond = Conditioning { context: context.as_ref(), ..Default::default() };
                let res =
                    c.controlnet.forward_embedded(&model_input, timesteps, &c.embedded, c.conditioning_scale, &cond)?;
                unet.forward(&model_input, timesteps, &res.conditioning(context.as_ref(), None))?
            }
            None => unet.forward(
                &model_input,
                timesteps,
                &Conditioning { context: context.as_ref(), ..Default::default() },
            )?,
        }
    };
    let output = output.f_to_kind(Kind::Float)?;
    Ok(match guidance {
        Some(g) => {
            let halves = output.chunk(2, 0);
            let (uncond, cond) = (&halves[0], &halves[1]);
            uncond + (cond - uncond) * g
        }
        None => output,
    })
}

/// Runs the reverse process from `noise` over `scheduler.timesteps()` (call `set_timesteps`
/// first) and returns the final latent (float32). The networks run under `precision`'s autocast
/// (float32: none); the noise, the guidance and the scheduler stay in float32. `on_step(i, n)`
/// is called after each step.
pub fn sample_latent(
    unet: &DiffusionModelUNet,
    control: Option<&Control>,
    scheduler: &mut dyn Scheduler,
    noise: &Tensor,
    text: &TextConditioning,
    precision: Precision,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    if let Some(c) = control {
        ensure!(
            c.cond.size().first() == noise.size().first(),
            "the control image batch {:?} differs from the noise batch {:?}",
            c.cond.size(),
            noise.size()
        );
    }
    ensure!(noise.kind() == Kind::Float, "the initial noise must be float32, got {:?}", noise.kind());
    let _guard = tch::no_grad_guard();
    let prepared = control.map(|c| PreparedControl::new(c, noise, text, precision)).transpose()?;
    let timesteps = scheduler.timesteps().to_vec();
    // Every step's `[t]` moved to the device at once, not one copy per step.
    let on_device = Tensor::f_from_slice(&timesteps)?.f_to_device(noise.device())?;
    let mut latent = noise.shallow_clone();
    for (i, &t) in timesteps.iter().enumerate() {
        let model_output =
            predict(unet, prepared.as_ref(), &latent, &on_device.narrow(0, i as i64, 1), text, precision)?;
        latent = scheduler.step(&model_output, t, &latent)?.0;
        on_step(i + 1, timesteps.len());
    }
    Ok(latent)
}

/// `autoencoder.decode_stage_2_outputs(latent / scale_factor)`, the decoder under `precision`'s
/// autocast, the image returned in float32.
pub fn decode_latent(
    autoencoder: &AutoencoderKL,
    latent: &Tensor,
    scale_factor: f64,
    precision: Precision,
) -> Result<Tensor> {
    ensure!(scale_factor != 0.0 && scale_factor.is_finite(), "scale_factor must be finite and non-zero");
    let _guard = tch::no_grad_guard();
    let image = {
        let _autocast = precision.autocast(latent.device());
        autoencoder.decode_stage_2_outputs(&(latent / scale_factor))?
    };
    image.f_to_kind(Kind::Float).map_err(Into::into)
}

/// [`decode_latent`] (float32) by MONAI's sliding window over `latent / scale_factor`: the decoder runs on one
/// window of `window.roi_size` latent voxels at a time and the windows' images are blended, so its activations are
/// bounded by the window, not the latent. Equal to `SlidingWindowInferer(...)(latent / scale_factor,
/// autoencoder.decode_stage_2_outputs)` with the same settings.
pub fn decode_latent_windowed(
    autoencoder: &AutoencoderKL,
    latent: &Tensor,
    scale_factor: f64,
    window: &SlidingWindowConfig,
) -> Result<Tensor> {
    ensure!(scale_factor != 0.0 && scale_factor.is_finite(), "scale_factor must be finite and non-zero");
    let _guard = tch::no_grad_guard();
    let z = latent.f_to_kind(Kind::Float)? / scale_factor;
    sliding_window_inference(&z, window, |w| autoencoder.decode_stage_2_outputs(w))
}
