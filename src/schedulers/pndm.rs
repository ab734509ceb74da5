//! PNDM (Liu et al. 2022, F-PNDM: 3 Runge-Kutta steps of 4 model calls, then linear
//! multistep), after MONAI 1.6.1 `PNDMScheduler` (identical to monai-generative 0.2.3's).
//!
//! MONAI quirks reproduced:
//! - With PRK steps, `set_timesteps(n)` overwrites `num_inference_steps` with the number of
//!   timesteps (19 for n=10), and both strides are then computed from it: the PRK half step is
//!   `T // 19 // 2 = 26` and the PLMS stride `T // 19 = 52`, not 50 and 100. The (t, prev) pairs
//!   for n=10 are (900,874), (900,850), (900,824), (900,800), (800,774), ..., (600,548), ...,
//!   (0,-52). `skip_prk_steps` (what LDM pipelines use) keeps the stride `T // n`.
//! - The PRK steps take ᾱ_t from the first timestep of their group of 4, and ᾱ_prev from the
//!   timestep passed in minus the half step (every other call); PLMS step 1 (skip mode)
//!   recomputes the first step with the averaged model output.
//! - The skip-PRK timestep list is `arange(n) * (T//n)` reversed, with no repeated step
//!   (diffusers repeats one).
//! - `step` uses the timestep passed in, not its own list, so callers must pass `timesteps()`
//!   in order; the multistep state (`ets`, `counter`) is reset only by `set_timesteps`.
//! - With PRK steps, `n < 4` fails (MONAI's numpy broadcast error).
use super::{
    check_num_inference_steps, check_same_shape, check_timestep, leading_timesteps, sqrt32, NoiseSchedule,
    PredictionType, Scheduler, SchedulerConfig, SchedulerKind,
};
use anyhow::{ensure, Context, Result};
use tch::Tensor;

/// MONAI's `PNDMScheduler` constructor defaults for the fields `SchedulerConfig` leaves unset.
pub const PNDM_SKIP_PRK_STEPS: bool = false;
pub const PNDM_SET_ALPHA_TO_ONE: bool = false;
pub const PNDM_STEPS_OFFSET: i64 = 0;

/// F-PNDM order: 4 model calls per Runge-Kutta step, 4 past outputs in the multistep.
const PNDM_ORDER: usize = 4;

#[derive(Debug)]
pub struct PndmScheduler {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    final_alpha_cumprod: f32,
    skip_prk_steps: bool,
    steps_offset: i64,
    num_inference_steps: usize,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<i64>,
    // Multistep state, reset by set_timesteps.
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
    last_step_indices: Option<(i64, i64)>,
}

impl PndmScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        cfg.check_applies_to(SchedulerKind::Pndm)?;
        let schedule = NoiseSchedule::from_config(cfg)?;
        let t = schedule.num_train_timesteps();
        let set_alpha_to_one = cfg.set_alpha_to_one.unwrap_or(PNDM_SET_ALPHA_TO_ONE);
        let final_alpha_cumprod = if set_alpha_to_one { 1.0 } else { schedule.alpha_cumprod_at(0)? };
        let mut s = Self {
            schedule,
            prediction_type: cfg.prediction_type,
            final_alpha_cumprod,
            skip_prk_steps: cfg.skip_prk_steps.unwrap_or(PNDM_SKIP_PRK_STEPS),
            steps_offset: cfg.steps_offset.unwrap_or(PNDM_STEPS_OFFSET),
            num_inference_steps: 0,
            prk_timesteps: Vec::new(),
            timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
            last_step_indices: None,
        };
        // As MONAI's constructor.
        s.set_timesteps(usize::try_from(t)?)?;
        Ok(s)
    }

    /// ᾱ "before" timestep 0: 1 with `set_alpha_to_one`, else ᾱ[0].
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// The timesteps run as Runge-Kutta steps (the first 12, or none with `skip_prk_steps`).
    pub fn prk_timesteps(&self) -> &[i64] {
        &self.prk_timesteps
    }

    /// How many `step` calls since `set_timesteps`.
    pub fn counter(&self) -> usize {
        self.counter
    }

    /// The (ᾱ index, ᾱ_prev index) pair the last step used; a negative `prev` means the final ᾱ.
    pub fn last_step_indices(&self) -> Option<(i64, i64)> {
        self.last_step_indices
    }

    fn stride(&self) -> i64 {
        self.schedule.num_train_timesteps() / self.num_inference_steps as i64
    }

    /// Runge-Kutta: four calls per step with weights 1/6, 1/3, 1/3, 1/6, all from the sample
    /// at the start of the group.
    fn step_prk(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { self.stride() / 2 };
        let prev_t = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(model_output * (1.0 / 6.0));
                self.ets.push(model_output.shallow_clone());
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            1 | 2 => {
                let acc = self.cur_model_output.take().context("pndm: PRK state lost")?;
                self.cur_model_output = Some(acc + model_output * (1.0 / 3.0));
                model_output.shallow_clone()
            }
            _ => {
                let acc = self.cur_model_output.take().context("pndm: PRK state lost")?;
                acc + model_output * (1.0 / 6.0)
            }
        };
        let cur_sample = self.cur_sample.as_ref().unwrap_or(sample).shallow_clone();
        let prev = self.prev_sample(&cur_sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Linear multistep (Adams-Bashforth of increasing order over the stored outputs).
    fn step_plms(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        ensure!(
            self.skip_prk_steps || self.ets.len() >= 3,
            "pndm: PLMS steps can only run after the 12 PRK steps (run the timesteps in order after set_timesteps)"
        );
        let stride = self.stride();
        let (mut t, mut prev_t) = (timestep, timestep - stride);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.shallow_clone());
        } else {
            // The second call re-runs the first step from its sample, with the averaged output.
            prev_t = timestep;
            t = timestep + stride;
        }
        let mut sample = sample.shallow_clone();
        let e = &self.ets;
        let n = e.len();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.shallow_clone());
            model_output.shallow_clone()
        } else if n == 1 && self.counter == 1 {
            sample = self.cur_sample.take().context("pndm: PLMS state lost (no sample from the first step)")?;
            (model_output + &e[0]) / 2.0
        } else if n == 2 {
            (&e[1] * 3.0 - &e[0]) / 2.0
        } else if n == 3 {
            (&e[2] * 23.0 - &e[1] * 16.0 + &e[0] * 5.0) / 12.0
        } else {
            (&e[3] * 55.0 - &e[2] * 59.0 + &e[1] * 37.0 - &e[0] * 9.0) * (1.0 / 24.0)
        };
        let prev = self.prev_sample(&sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Formula (9) of the PNDM paper: x_{t−δ} from x_t and ε.
    fn prev_sample(&mut self, sample: &Tensor, t: i64, prev_t: i64, model_output: &Tensor) -> Result<Tensor> {
        self.last_step_indices = Some((t, prev_t));
        let ap_t = self.schedule.alpha_cumprod_at(t)?;
        let ap_prev = if prev_t >= 0 { self.schedule.alpha_cumprod_at(prev_t)? } else { self.final_alpha_cumprod };
        let bp_t = 1.0 - ap_t;
        let bp_prev = 1.0 - ap_prev;
        let eps = match self.prediction_type {
            PredictionType::VPrediction => model_output * f64::from(sqrt32(ap_t)?) + sample * f64::from(sqrt32(bp_t)?),
            _ => model_output.shallow_clone(),
        };
        let sample_coeff = sqrt32(ap_prev / ap_t)?;
        let denom = ap_t * sqrt32(bp_prev)? + sqrt32(ap_t * bp_t * ap_prev)?;
        Ok(sample * f64::from(sample_coeff) - eps * f64::from(ap_prev - ap_t) / f64::from(denom))
    }
}

impl Scheduler for PndmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pndm
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
        let t_max = self.schedule.num_train_timesteps();
        let n = check_num_inference_steps(num_inference_steps, t_max)?;
        let ascending: Vec<i64> = leading_timesteps(t_max, n).into_iter().map(|x| x + self.steps_offset).collect();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            (Vec::new(), ascending.iter().rev().copied().collect())
        } else {
            ensure!(
                ascending.len() >= PNDM_ORDER,
                "pndm: num_inference_steps {n} is below {PNDM_ORDER}, the minimum with Runge-Kutta steps \
                 (or set skip_prk_steps)"
            );
            // Each of the last 4 timesteps and its half step, then every point but the last
            // twice, dropping both ends: t0, t0+h, t0+h, t1, t1, ..., t3, t3+h, t3+h, reversed.
            let half = t_max / n / 2;
            let last = &ascending[ascending.len() - PNDM_ORDER..];
            let points: Vec<i64> = last.iter().flat_map(|&x| [x, x + half]).collect();
            let doubled: Vec<i64> = points[..points.len() - 1].iter().flat_map(|&x| [x, x]).collect();
            let prk: Vec<i64> = doubled[1..doubled.len() - 1].iter().rev().copied().collect();
            let plms = ascending[..ascending.len() - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        self.timesteps = prk.iter().chain(&plms).copied().collect();
        self.prk_timesteps = prk;
        // Quirk: the stride is computed from the number of timesteps from now on.
        self.num_inference_steps = self.timesteps.len();
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
        self.last_step_indices = None;
        Ok(())
    }

    fn step(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        check_timestep(SchedulerKind::Pndm, timestep, self.schedule.num_train_timesteps())?;
        check_same_shape("pndm step", model_output, "model_output", sample, "sample")?;
        let prev = if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, timestep, sample)?
        } else {
            self.step_plms(model_output, timestep, sample)?
        };
        Ok((prev, None))
    }
}
