//! DDIM (Song et al. 2021), after MONAI 1.6.1 `DDIMScheduler`, with monai-generative 0.2.3's
//! inversion step as `reversed_step_legacy`.
//!
//! MONAI quirks reproduced:
//! - The previous timestep is `t − T // n`, whatever the timestep list says: with the
//!   `linspace` spacing and `T % n != 0` the two disagree (n=7: 999 → 857, not 832).
//! - `steps_offset` outside `[0, T)` is refused by `set_timesteps`, which the constructor calls
//!   with `n = T`.
//! - `eta > 0` draws `randn(model_output.shape)` from the global generator on every step.
//! - `reversed_step` (MONAI 1.6.1) checks `t + T//n >= 0` instead of `< T`, so it fails past the
//!   last training timestep; monai-generative used `first_alpha_cumprod` there.
use super::{
    check_num_inference_steps, check_same_shape, check_timestep, draw_noise, leading_timesteps, linspace_timesteps,
    pred_original, sqrt32, NoiseDevice, NoiseSchedule, PredictionType, Scheduler, SchedulerConfig, SchedulerKind,
    TimestepSpacing,
};
use anyhow::{bail, ensure, Result};
use tch::Tensor;

/// MONAI's `DDIMScheduler` constructor defaults for the fields `SchedulerConfig` leaves unset
/// (plus `eta`, the default of its `step` argument).
pub const DDIM_CLIP_SAMPLE: bool = true;
pub const DDIM_CLIP_SAMPLE_RANGE: (f64, f64) = (-1.0, 1.0);
pub const DDIM_SET_ALPHA_TO_ONE: bool = true;
pub const DDIM_STEPS_OFFSET: i64 = 0;
pub const DDIM_ETA: f64 = 0.0;

#[derive(Debug)]
pub struct DdimScheduler {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    clip_sample: bool,
    clip_range: (f64, f64),
    set_alpha_to_one: bool,
    /// ᾱ "before" timestep 0: 1, or ᾱ[0].
    final_alpha_cumprod: f32,
    steps_offset: i64,
    eta: f64,
    timestep_spacing: TimestepSpacing,
    noise_device: NoiseDevice,
    num_inference_steps: usize,
    timesteps: Vec<i64>,
}

impl DdimScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        cfg.check_applies_to(SchedulerKind::Ddim)?;
        let schedule = NoiseSchedule::from_config(cfg)?;
        let t = schedule.num_train_timesteps();
        let set_alpha_to_one = cfg.set_alpha_to_one.unwrap_or(DDIM_SET_ALPHA_TO_ONE);
        let final_alpha_cumprod = if set_alpha_to_one { 1.0 } else { schedule.alpha_cumprod_at(0)? };
        let mut s = Self {
            schedule,
            prediction_type: cfg.prediction_type,
            clip_sample: cfg.clip_sample.unwrap_or(DDIM_CLIP_SAMPLE),
            clip_range: (
                cfg.clip_sample_min.unwrap_or(DDIM_CLIP_SAMPLE_RANGE.0),
                cfg.clip_sample_max.unwrap_or(DDIM_CLIP_SAMPLE_RANGE.1),
            ),
            set_alpha_to_one,
            final_alpha_cumprod,
            steps_offset: cfg.steps_offset.unwrap_or(DDIM_STEPS_OFFSET),
            eta: cfg.eta.unwrap_or(DDIM_ETA),
            timestep_spacing: cfg.timestep_spacing.unwrap_or_default(),
            noise_device: cfg.noise_device.unwrap_or_default(),
            num_inference_steps: 0,
            timesteps: Vec::new(),
        };
        // As MONAI's constructor: every training timestep until told otherwise.
        s.set_timesteps(usize::try_from(t)?)?;
        Ok(s)
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    fn stride(&self) -> i64 {
        self.schedule.num_train_timesteps() / self.num_inference_steps as i64
    }

    /// `(x0, ε)` from the model output, then x0 clipped; ε is taken before clipping.
    fn predict(&self, model_output: &Tensor, sample: &Tensor, ap_t: f32) -> Result<(Tensor, Tensor)> {
        let bp_t = 1.0 - ap_t;
        let (sqrt_a, sqrt_b) = (sqrt32(ap_t)?, sqrt32(bp_t)?);
        let (a, b) = (f64::from(sqrt_a), f64::from(sqrt_b));
        let x0 = pred_original(self.prediction_type, model_output, sample, sqrt_a, sqrt_b);
        let eps = match self.prediction_type {
            PredictionType::Epsilon => model_output.shallow_clone(),
            PredictionType::Sample => (sample - &x0 * a) / b,
            PredictionType::VPrediction => model_output * a + sample * b,
        };
        let x0 = if self.clip_sample { x0.f_clamp(self.clip_range.0, self.clip_range.1)? } else { x0 };
        Ok((x0, eps))
    }

    /// MONAI's `_get_variance`: σ_t² / η² of formula (16).
    fn variance(&self, ap_t: f32, ap_prev: f32) -> f32 {
        let (bp_t, bp_prev) = (1.0 - ap_t, 1.0 - ap_prev);
        (bp_prev / bp_t) * (1.0 - ap_t / ap_prev)
    }

    /// A step with an explicit `eta` (MONAI's `step(..., eta)`); `step` uses the config's.
    pub fn step_with_eta(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        eta: f64,
    ) -> Result<(Tensor, Option<Tensor>)> {
        check_timestep(SchedulerKind::Ddim, timestep, self.schedule.num_train_timesteps())?;
        check_same_shape("ddim step", model_output, "model_output", sample, "sample")?;
        let prev_t = timestep - self.stride();
        let ap_t = self.schedule.alpha_cumprod_at(timestep)?;
        let ap_prev = if prev_t >= 0 { self.schedule.alpha_cumprod_at(prev_t)? } else { self.final_alpha_cumprod };
        let (x0, eps) = self.predict(model_output, sample, ap_t)?;

        // Python float times float32 0-d tensor: eta rounds to f32 first.
        let eta32 = eta as f32;
        let variance = self.variance(ap_t, ap_prev);
        let std_dev_t = eta32 * sqrt32(variance)?;
        let direction = eps * f64::from(sqrt32(1.0 - ap_prev - std_dev_t * std_dev_t)?);
        let mut prev = &x0 * f64::from(sqrt32(ap_prev)?) + direction;
        if eta > 0.0 {
            let noise = draw_noise(model_output, self.noise_device)?;
            prev += noise * f64::from(sqrt32(variance)? * eta32);
        }
        Ok((prev, Some(x0)))
    }

    /// DDIM inversion, `x_t → x_{t + T//n}` (MONAI 1.6.1): fails when `t + T//n >= T`, where
    /// MONAI raises an IndexError.
    pub fn reversed_step(&self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<(Tensor, Tensor)> {
        self.reversed(model_output, timestep, sample, false)
    }

    /// DDIM inversion as monai-generative 0.2.3 has it: past the last training timestep ᾱ_next
    /// is 0 with `set_alpha_to_one`, else ᾱ[T−1].
    pub fn reversed_step_legacy(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.reversed(model_output, timestep, sample, true)
    }

    fn reversed(
        &self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        legacy: bool,
    ) -> Result<(Tensor, Tensor)> {
        let t_max = self.schedule.num_train_timesteps();
        check_timestep(SchedulerKind::Ddim, timestep, t_max)?;
        check_same_shape("ddim reversed_step", model_output, "model_output", sample, "sample")?;
        let next_t = timestep + self.stride();
        let ap_t = self.schedule.alpha_cumprod_at(timestep)?;
        let ap_next = if next_t < t_max {
            self.schedule.alpha_cumprod_at(next_t)?
        } else if legacy {
            if self.set_alpha_to_one {
                0.0
            } else {
                self.schedule.alpha_cumprod_at(t_max - 1)?
            }
        } else {
            bail!(
                "ddim reversed_step: timestep {timestep} + {} = {next_t} is past the last training timestep {} \
                 (MONAI 1.6.1 raises IndexError here; reversed_step_legacy uses monai-generative's rule)",
                self.stride(),
                t_max - 1
            );
        };
        let (x0, eps) = self.predict(model_output, sample, ap_t)?;
        let direction = eps * f64::from(sqrt32(1.0 - ap_next)?);
        let next = &x0 * f64::from(sqrt32(ap_next)?) + direction;
        Ok((next, x0))
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn num_inference_steps(&self) -> Option<usize> {
        Some(self.num_inference_steps)
    }

    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let t = self.schedule.num_train_timesteps();
        let n = check_num_inference_steps(num_inference_steps, t)?;
        let offset = self.steps_offset;
        ensure!((0..t).contains(&offset), "steps_offset {offset} must be in range [0, {t})");
        let base = match self.timestep_spacing {
            TimestepSpacing::Linspace => linspace_timesteps(t - 1 - offset, n)?,
            TimestepSpacing::Leading => leading_timesteps(t, n).into_iter().rev().collect(),
            // Unreachable: the constructor's check_applies_to refuses it.
            TimestepSpacing::Trailing => {
                bail!("ddim: the `trailing` timestep spacing is diffusers' (dpm-solver++, unipc only)")
            }
        };
        self.timesteps = base.into_iter().map(|x| x + offset).collect();
        self.num_inference_steps = num_inference_steps;
        Ok(())
    }

    fn step(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        self.step_with_eta(model_output, timestep, sample, self.eta)
    }
}
