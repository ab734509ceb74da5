//! DDPM (Ho et al. 2020), after MONAI 1.6.1 `DDPMScheduler`.
//!
//! MONAI quirks reproduced:
//! - `step` takes ᾱ_prev from `t − 1`, not from the previous inference timestep, so the
//!   posterior is only right when every timestep is run (`n == T`). With fewer steps the
//!   sampler still runs, as MONAI's does.
//! - `learned`/`learned_range` split the model output into (prediction, variance) only when it
//!   has twice the sample's channels; otherwise the unclamped posterior variance is used.
//! - `learned_range` interpolates the variances themselves (MONAI's `min_log`/`max_log` names
//!   notwithstanding), and `learned` takes the predicted variance as is (sqrt of a negative
//!   value gives NaN, as in PyTorch).
use super::{
    check_num_inference_steps, check_same_shape, check_timestep, draw_noise, leading_timesteps, linspace_timesteps,
    pred_original, sqrt32, NoiseDevice, NoiseSchedule, PredictionType, Scheduler, SchedulerConfig, SchedulerKind,
    TimestepSpacing, VarianceType,
};
use anyhow::{bail, ensure, Result};
use tch::Tensor;

/// MONAI's `DDPMScheduler` constructor defaults for the fields `SchedulerConfig` leaves unset.
pub const DDPM_CLIP_SAMPLE: bool = true;
pub const DDPM_CLIP_SAMPLE_RANGE: (f64, f64) = (-1.0, 1.0);

#[derive(Debug)]
pub struct DdpmScheduler {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    variance_type: VarianceType,
    clip_sample: bool,
    clip_range: (f64, f64),
    timestep_spacing: TimestepSpacing,
    noise_device: NoiseDevice,
    num_inference_steps: Option<usize>,
    timesteps: Vec<i64>,
}

impl DdpmScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        cfg.check_applies_to(SchedulerKind::Ddpm)?;
        let schedule = NoiseSchedule::from_config(cfg)?;
        let t = schedule.num_train_timesteps();
        Ok(Self {
            schedule,
            prediction_type: cfg.prediction_type,
            variance_type: cfg.variance_type.unwrap_or_default(),
            clip_sample: cfg.clip_sample.unwrap_or(DDPM_CLIP_SAMPLE),
            clip_range: (
                cfg.clip_sample_min.unwrap_or(DDPM_CLIP_SAMPLE_RANGE.0),
                cfg.clip_sample_max.unwrap_or(DDPM_CLIP_SAMPLE_RANGE.1),
            ),
            timestep_spacing: cfg.timestep_spacing.unwrap_or_default(),
            noise_device: cfg.noise_device.unwrap_or_default(),
            num_inference_steps: None,
            // Before set_timesteps MONAI's base class lists every training timestep.
            timesteps: (0..t).rev().collect(),
        })
    }

    pub fn variance_type(&self) -> VarianceType {
        self.variance_type
    }

    /// MONAI's `_get_variance`: the posterior variance at `t`, as a scalar or, for learned
    /// variances, a tensor.
    fn variance(&self, t: i64, predicted: Option<&Tensor>) -> Result<Variance> {
        let ap_t = self.schedule.alpha_cumprod_at(t)?;
        let ap_prev = if t > 0 { self.schedule.alpha_cumprod_at(t - 1)? } else { 1.0 };
        let beta_t = self.schedule.beta_at(t)?;
        let variance = (1.0 - ap_prev) / (1.0 - ap_t) * beta_t;
        Ok(match (self.variance_type, predicted) {
            // clamp(min=1e-20) keeps NaN, unlike f32::max.
            (VarianceType::FixedSmall, _) => Variance::Scalar(if variance < 1e-20 { 1e-20 } else { variance }),
            (VarianceType::FixedLarge, _) => Variance::Scalar(beta_t),
            (VarianceType::Learned, Some(pv)) => Variance::Tensor(pv.shallow_clone()),
            (VarianceType::LearnedRange, Some(pv)) => {
                let frac = (pv + 1.0) / 2.0;
                let (max_v, min_v) = (f64::from(beta_t), f64::from(variance));
                Variance::Tensor(&frac * max_v + (1f64 - &frac) * min_v)
            }
            (VarianceType::Learned | VarianceType::LearnedRange, None) => Variance::Scalar(variance),
        })
    }
}

enum Variance {
    Scalar(f32),
    Tensor(Tensor),
}

impl Scheduler for DdpmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
    }

    fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let t = self.schedule.num_train_timesteps();
        let n = check_num_inference_steps(num_inference_steps, t)?;
        self.timesteps = match self.timestep_spacing {
            TimestepSpacing::Linspace => linspace_timesteps(t - 1, n)?,
            TimestepSpacing::Leading => leading_timesteps(t, n).into_iter().rev().collect(),
            // Unreachable: the constructor's check_applies_to refuses it.
            TimestepSpacing::Trailing => {
                bail!("ddpm: the `trailing` timestep spacing is diffusers' (dpm-solver++, unipc only)")
            }
        };
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn step(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        check_timestep(SchedulerKind::Ddpm, timestep, self.schedule.num_train_timesteps())?;
        let learned = matches!(self.variance_type, VarianceType::Learned | VarianceType::LearnedRange);
        let (mo_size, s_size) = (model_output.size(), sample.size());
        let split = learned
            && mo_size.len() >= 2
            && s_size.len() >= 2
            && mo_size[1] == 2 * s_size[1]
            && mo_size[0] == s_size[0]
            && mo_size[2..] == s_size[2..];
        let (model_output, predicted_variance) = if split {
            let mut parts = model_output.f_split(s_size[1], 1)?;
            let pv = parts.pop();
            (parts.pop().expect("split gives two halves"), pv)
        } else {
            check_same_shape("ddpm step", model_output, "model_output", sample, "sample")?;
            (model_output.shallow_clone(), None)
        };

        let t = timestep;
        let ap_t = self.schedule.alpha_cumprod_at(t)?;
        // Quirk: t − 1, whatever the inference step stride.
        let ap_prev = if t > 0 { self.schedule.alpha_cumprod_at(t - 1)? } else { 1.0 };
        let bp_t = 1.0 - ap_t;
        let bp_prev = 1.0 - ap_prev;

        let mut x0 = pred_original(self.prediction_type, &model_output, sample, sqrt32(ap_t)?, sqrt32(bp_t)?);
        if self.clip_sample {
            x0 = x0.f_clamp(self.clip_range.0, self.clip_range.1)?;
        }

        // Formula (7) of Ho et al.
        let x0_coeff = sqrt32(ap_prev)? * self.schedule.beta_at(t)? / bp_t;
        let sample_coeff = sqrt32(self.schedule.alpha_at(t)?)? * bp_prev / bp_t;
        let mut prev = &x0 * f64::from(x0_coeff) + sample * f64::from(sample_coeff);

        if t > 0 {
            let noise = draw_noise(&model_output, self.noise_device)?;
            let added = match self.variance(t, predicted_variance.as_ref())? {
                Variance::Scalar(v) => noise * f64::from(sqrt32(v)?),
                Variance::Tensor(v) => v.f_pow_tensor_scalar(0.5)? * noise,
            };
            prev += added;
        }
        ensure!(prev.size() == s_size, "ddpm step: result shape {:?} != sample shape {s_size:?}", prev.size());
        Ok((prev, Some(x0)))
    }
}
