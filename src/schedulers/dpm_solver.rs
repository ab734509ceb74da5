//! DPM-Solver++ multistep (Lu et al. 2022), after diffusers 0.42 `DPMSolverMultistepScheduler`
//! with `algorithm_type="dpmsolver++"`, `solver_type="midpoint"`, `final_sigmas_type="zero"`,
//! no thresholding and no Karras/exponential/beta/flow sigmas; orders 1 and 2.
//!
//! diffusers behaviour reproduced:
//! - The last step is always first order: with `final_sigmas_type="zero"` diffusers lowers it
//!   whatever `lower_order_final` says. `lower_order_final` otherwise matters only for order 3
//!   (its second-to-last step), so with orders 1 and 2 it is accepted and changes nothing.
//! - The first step is first order (no earlier output yet).
//! - The update runs on the sample upcast to float32 and is cast back to the data prediction's
//!   dtype (the sample's here, as the model output is cast to it first).
use super::multistep::{exp32, Multistep, Point};
use super::{NoiseSchedule, PredictionType, Scheduler, SchedulerConfig, SchedulerKind};
use anyhow::{Context, Result};
use tch::{Kind, Tensor};

pub use super::multistep::{
    MULTISTEP_LOWER_ORDER_FINAL as DPM_LOWER_ORDER_FINAL, MULTISTEP_SOLVER_ORDER as DPM_SOLVER_ORDER,
    MULTISTEP_STEPS_OFFSET as DPM_STEPS_OFFSET,
};

#[derive(Debug)]
pub struct DpmSolverScheduler {
    m: Multistep,
}

impl DpmSolverScheduler {
    /// diffusers' constructor: the timesteps are `T-1..0` and `num_inference_steps` is `None`
    /// until `set_timesteps`, before which `step` fails.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        Ok(Self { m: Multistep::new(cfg, SchedulerKind::DpmSolver)? })
    }

    pub fn solver_order(&self) -> usize {
        self.m.solver_order
    }

    pub fn lower_order_final(&self) -> bool {
        self.m.lower_order_final
    }

    /// The sigma of each timestep, then the final 0 (diffusers' `sigmas` after `set_timesteps`).
    pub fn sigmas(&self) -> &[f32] {
        &self.m.sigmas
    }

    /// Steps run since `set_timesteps`.
    pub fn step_index(&self) -> usize {
        self.m.step_index
    }

    /// `dpm_solver_first_order_update` (DDIM in the data-prediction form).
    fn first_order(&self, x0: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.m.step_index;
        let (t, s) = (self.m.point(i + 1)?, self.m.point(i)?);
        let h = t.lambda - s.lambda;
        let c_sample = t.sigma / s.sigma;
        let c_x0 = t.alpha * (exp32(-h)? - 1.0);
        Ok(sample * f64::from(c_sample) - x0 * f64::from(c_x0))
    }

    /// `multistep_dpm_solver_second_order_update`, midpoint form.
    fn second_order(&self, sample: &Tensor) -> Result<Tensor> {
        let i = self.m.step_index;
        let prev = i.checked_sub(1).context("dpm-solver++: a second-order step at the first step")?;
        let (t, s0, s1): (Point, Point, Point) = (self.m.point(i + 1)?, self.m.point(i)?, self.m.point(prev)?);
        let (m0, m1) = (self.m.model_output(0)?, self.m.model_output(1)?);
        let (h, h_0) = (t.lambda - s0.lambda, s0.lambda - s1.lambda);
        let r0 = h_0 / h;
        // `(1.0 / r0) * (m0 - m1)`
        let d1 = (m0 - m1) * f64::from(1.0 / r0);
        let c_sample = t.sigma / s0.sigma;
        let c_d0 = t.alpha * (exp32(-h)? - 1.0);
        let c_d1 = 0.5 * c_d0;
        Ok(sample * f64::from(c_sample) - m0 * f64::from(c_d0) - d1 * f64::from(c_d1))
    }
}

impl Scheduler for DpmSolverScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolver
    }

    fn noise_schedule(&self) -> &NoiseSchedule {
        &self.m.schedule
    }

    fn prediction_type(&self) -> PredictionType {
        self.m.prediction_type
    }

    fn num_inference_steps(&self) -> Option<usize> {
        self.m.num_inference_steps
    }

    fn timesteps(&self) -> &[i64] {
        &self.m.timesteps
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.m.set_timesteps(num_inference_steps)
    }

    fn step(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let model_output = self.m.begin_step(model_output, timestep, sample)?;
        let last = self.m.step_index + 1 == self.m.timesteps.len();
        let x0 = self.m.data_prediction(&model_output, sample)?;
        self.m.push_model_output(&x0);
        let sample32 = sample.f_to_kind(Kind::Float)?;
        let prev = if self.m.solver_order == 1 || self.m.lower_order_nums < 1 || last {
            self.first_order(&x0, &sample32)?
        } else {
            self.second_order(&sample32)?
        };
        let prev = prev.f_to_kind(x0.kind())?;
        self.m.end_step();
        Ok((prev, Some(x0)))
    }
}
