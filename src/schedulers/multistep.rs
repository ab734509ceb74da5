//! What DPM-Solver++ and UniPC share, after diffusers 0.42 (`scheduling_dpmsolver_multistep.py`
//! and `scheduling_unipc_multistep.py`): the timesteps of `set_timesteps`, the sigma table, the
//! (α_t, σ_t, λ_t) of a sigma, the data prediction x0, and the bookkeeping of a multistep run.
//!
//! diffusers' numerics, reproduced:
//! - Timesteps are computed in numpy float64 (`np.linspace`, `np.arange`), rounded half to even.
//! - The sigma table is `((1 − ᾱ) / ᾱ) ** 0.5` on the float32 ᾱ tensor; `set_timesteps` picks it
//!   at the timesteps (`np.interp` at the knots gives the table values exactly), appends the
//!   final sigma 0 (`final_sigmas_type="zero"`) and stores float32.
//! - Each step works on float32 0-d tensors taken from that table. Here the coefficients are f32
//!   scalars; +, −, ×, ÷ round as PyTorch's float32 ops do, and every other op (sqrt, log, exp,
//!   expm1, the corrector's 2×2 solve) runs on a 0-d CPU tensor through libtorch, as in diffusers.
//!   On CPU the results are bit-identical.
//! - ᾱ is medgen's own (the schedule the model was trained with); diffusers, given the same
//!   betas as `trained_betas`, rebuilds the same table, except for the legacy cosine schedule,
//!   whose ᾱ is not the product of its alphas.
//!
//! Where medgen refuses what diffusers runs: timestep lists diffusers gets wrong (the `trailing`
//! spacing's arange can yield n+1 timesteps ending at −1; `leading`/`linspace` repeat timesteps
//! when n is close to T, and a repeated timestep makes a zero-length step that divides by zero;
//! `leading` plus `steps_offset` can pass T−1, where numpy's interp silently clamps), a
//! `steps_offset` the spacing ignores, and timesteps out of order (diffusers looks the first one
//! up and then counts steps, whatever the caller passes).
use super::{
    check_num_inference_steps, check_same_shape, NoiseSchedule, PredictionType, SchedulerConfig, SchedulerKind,
    TimestepSpacing,
};
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

/// diffusers' constructor defaults shared by both samplers.
pub const MULTISTEP_SOLVER_ORDER: usize = 2;
pub const MULTISTEP_LOWER_ORDER_FINAL: bool = true;
pub const MULTISTEP_STEPS_OFFSET: i64 = 0;

/// The orders implemented (diffusers also has 3 for both, and more for UniPC).
const MAX_SOLVER_ORDER: usize = 2;

/// The configuration and run state of a diffusers multistep sampler.
#[derive(Debug)]
pub(super) struct Multistep {
    pub kind: SchedulerKind,
    pub schedule: NoiseSchedule,
    pub prediction_type: PredictionType,
    pub solver_order: usize,
    pub lower_order_final: bool,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    /// `sqrt((1 − ᾱ_t) / ᾱ_t)` for every training timestep.
    sigma_table: Vec<f32>,
    /// `None` until `set_timesteps`, as diffusers' attribute.
    pub num_inference_steps: Option<usize>,
    pub timesteps: Vec<i64>,
    /// The sigma of each timestep, then the final 0.
    pub sigmas: Vec<f32>,
    /// Steps run since `set_timesteps`.
    pub step_index: usize,
    /// The data predictions of the last `solver_order` steps, oldest first.
    pub model_outputs: Vec<Tensor>,
    /// Steps run so far, capped at `solver_order` (the warm-up counter).
    pub lower_order_nums: usize,
    /// Shape, dtype and device of the run's samples, fixed by its first step.
    run_like: Option<(Vec<i64>, Kind, Device)>,
}

impl Multistep {
    pub fn new(cfg: &SchedulerConfig, kind: SchedulerKind) -> Result<Self> {
        cfg.check_applies_to(kind)?;
        let schedule = NoiseSchedule::from_config(cfg)?;
        // Python's `((1 - ac) / ac) ** 0.5`, as the vector ops diffusers runs.
        let ac = schedule.alphas_cumprod();
        let table = ac.f_rsub_scalar(1.0)?.f_div(ac)?.f_pow_tensor_scalar(0.5)?;
        let t = schedule.num_train_timesteps();
        Ok(Self {
            kind,
            prediction_type: cfg.prediction_type,
            solver_order: cfg.solver_order.unwrap_or(MULTISTEP_SOLVER_ORDER),
            lower_order_final: cfg.lower_order_final.unwrap_or(MULTISTEP_LOWER_ORDER_FINAL),
            timestep_spacing: cfg.timestep_spacing.unwrap_or_default(),
            steps_offset: cfg.steps_offset.unwrap_or(MULTISTEP_STEPS_OFFSET),
            sigma_table: Vec::<f32>::try_from(&table)?,
            num_inference_steps: None,
            // diffusers' constructor: every training timestep, descending, before set_timesteps.
            timesteps: (0..t).rev().collect(),
            sigmas: Vec::new(),
            step_index: 0,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            run_like: None,
            schedule,
        })
    }

    /// diffusers' `set_timesteps(n)` (and the state reset it does).
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let kind = self.kind;
        let t = self.schedule.num_train_timesteps();
        let n = check_num_inference_steps(num_inference_steps, t)?;
        let timesteps = diffusers_timesteps(self.timestep_spacing, t, n, self.steps_offset);
        let spacing = spacing_name(self.timestep_spacing);
        ensure!(
            timesteps.len() == num_inference_steps,
            "{kind}: the `{spacing}` spacing gives {} timesteps for {n} steps ({:?} ... {:?}; numpy's arange rounds \
             T/n so that the list runs one past 0), which diffusers would run as it is; choose another number of steps",
            timesteps.len(),
            timesteps.first(),
            timesteps.last()
        );
        if let Some(bad) = timesteps.iter().find(|&&x| !(0..t).contains(&x)) {
            bail!(
                "{kind}: the `{spacing}` spacing with {n} steps and steps_offset {} gives timestep {bad}, outside \
                 [0, {t}) (diffusers would clamp its sigma silently); lower steps_offset or the number of steps",
                self.steps_offset
            );
        }
        if let Some(w) = timesteps.windows(2).find(|w| w[1] >= w[0]) {
            bail!(
                "{kind}: the `{spacing}` spacing with {n} steps repeats timestep {} (a step of length zero, which the \
                 solver divides by); use fewer steps",
                w[1]
            );
        }
        let mut sigmas = Vec::with_capacity(timesteps.len() + 1);
        for &x in &timesteps {
            let sigma = self.sigma_table[x as usize];
            ensure!(
                sigma.is_finite() && sigma > 0.0,
                "{kind}: at timestep {x} ᾱ is {} so sigma = sqrt((1 − ᾱ)/ᾱ) is {sigma}: the solver needs 0 < ᾱ < 1 at \
                 every timestep it visits (the legacy cosine schedule has ᾱ[0] = 1)",
                self.schedule.alpha_cumprod_at(x)?
            );
            sigmas.push(sigma);
        }
        // final_sigmas_type="zero": the last step lands on the clean sample.
        sigmas.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.num_inference_steps = Some(num_inference_steps);
        self.step_index = 0;
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.run_like = None;
        Ok(())
    }

    /// Checks that `timestep` is the next one and that the tensors fit the run; returns the
    /// model output in the sample's dtype (a network run under autocast gives bf16/fp16, the
    /// solver's arithmetic stays in the sample's precision).
    pub fn begin_step(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        let kind = self.kind;
        let Some(n) = self.num_inference_steps else {
            bail!("{kind} step: call set_timesteps first (the solver's sigmas come from it)");
        };
        let i = self.step_index;
        let Some(&expected) = self.timesteps.get(i) else {
            bail!("{kind} step: got timestep {timestep} but all {n} steps have run; call set_timesteps to start again");
        };
        ensure!(
            timestep == expected,
            "{kind} step: got timestep {timestep}, but step {i} of {n} is timestep {expected}: the multistep state \
             needs the timesteps of `timesteps()` in order, from the first"
        );
        check_same_shape(&format!("{kind} step"), model_output, "model_output", sample, "sample")?;
        ensure!(
            sample.is_floating_point() && model_output.is_floating_point(),
            "{kind} step: sample ({:?}) and model_output ({:?}) must be floating-point",
            sample.kind(),
            model_output.kind()
        );
        ensure!(
            model_output.device() == sample.device(),
            "{kind} step: model_output is on {:?} but sample is on {:?}",
            model_output.device(),
            sample.device()
        );
        let like = (sample.size(), sample.kind(), sample.device());
        match &self.run_like {
            Some(first) => ensure!(
                *first == like,
                "{kind} step {i}: sample is {like:?} (shape, dtype, device) but the run started with {first:?}; the \
                 stored outputs of earlier steps would not fit (call set_timesteps to start a new run)"
            ),
            None => self.run_like = Some(like),
        }
        Ok(if model_output.kind() == sample.kind() {
            model_output.shallow_clone()
        } else {
            model_output.f_to_kind(sample.kind())?
        })
    }

    /// diffusers' `convert_model_output` for a data-prediction solver: x0 at the current step.
    pub fn data_prediction(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let p = Point::of(self.sigmas[self.step_index])?;
        let (a, s) = (f64::from(p.alpha), f64::from(p.sigma));
        Ok(match self.prediction_type {
            PredictionType::Epsilon => (sample - model_output * s) / a,
            PredictionType::Sample => model_output.shallow_clone(),
            PredictionType::VPrediction => sample * a - model_output * s,
        })
    }

    /// Keeps the newest `solver_order` data predictions (diffusers shifts its list).
    pub fn push_model_output(&mut self, x0: &Tensor) {
        if self.model_outputs.len() == self.solver_order {
            let _oldest = self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0.shallow_clone());
    }

    /// The end of a step: warm-up counter and step index.
    pub fn end_step(&mut self) {
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.step_index += 1;
    }

    /// The data prediction `back` steps before the newest (0 is the newest).
    pub fn model_output(&self, back: usize) -> Result<&Tensor> {
        let len = self.model_outputs.len();
        match len.checked_sub(back + 1).and_then(|i| self.model_outputs.get(i)) {
            Some(t) => Ok(t),
            None => bail!("{}: multistep state lost (no model output {back} steps back of {len})", self.kind),
        }
    }

    /// The VP point of the sigma at `index` of `sigmas()`.
    pub fn point(&self, index: usize) -> Result<Point> {
        match self.sigmas.get(index) {
            Some(&s) => Point::of(s),
            None => bail!("{}: sigma index {index} out of range ({} sigmas)", self.kind, self.sigmas.len()),
        }
    }
}

/// The values `SchedulerConfig::check_applies_to` refuses for dpm-solver++ and unipc.
pub(super) fn check_config(cfg: &SchedulerConfig, kind: SchedulerKind) -> Result<()> {
    let solver_order = cfg.solver_order.unwrap_or(MULTISTEP_SOLVER_ORDER);
    ensure!(
        (1..=MAX_SOLVER_ORDER).contains(&solver_order),
        "scheduler {kind}: solver_order {solver_order} is not implemented (medgen has orders 1 and 2)"
    );
    let spacing = cfg.timestep_spacing.unwrap_or_default();
    let steps_offset = cfg.steps_offset.unwrap_or(MULTISTEP_STEPS_OFFSET);
    ensure!(
        steps_offset == 0 || spacing == TimestepSpacing::Leading,
        "scheduler {kind}: steps_offset {steps_offset} would have no effect: diffusers adds it with the `leading` \
         timestep spacing only, and this config uses `{}`",
        spacing_name(spacing)
    );
    // With order 2 the last UniPC step runs at order 2 onto sigma 0, where λ is infinite and diffusers'
    // `(m1 − m0) / r1` divides by zero (DPM-Solver++ lowers the last step to order 1 whatever the flag).
    ensure!(
        kind != SchedulerKind::UniPc
            || cfg.lower_order_final.unwrap_or(MULTISTEP_LOWER_ORDER_FINAL)
            || solver_order == 1,
        "scheduler {kind}: lower_order_final = false with solver_order {solver_order} is refused: the last step \
         would run at order 2 onto sigma 0, where diffusers divides by zero and returns inf/NaN"
    );
    Ok(())
}

fn spacing_name(s: TimestepSpacing) -> &'static str {
    match s {
        TimestepSpacing::Linspace => "linspace",
        TimestepSpacing::Leading => "leading",
        TimestepSpacing::Trailing => "trailing",
    }
}

/// The timesteps diffusers' `set_timesteps(n)` computes (numpy float64), unchecked.
pub(super) fn diffusers_timesteps(spacing: TimestepSpacing, t: i64, n: i64, steps_offset: i64) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, T-1, n+1): k·((T−1)/n), the last point set to T−1 exactly.
            let step = (t - 1) as f64 / n as f64;
            (1..=n)
                .rev()
                .map(|k| {
                    let y = if k == n { (t - 1) as f64 } else { k as f64 * step };
                    y.round_ties_even() as i64
                })
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = t / (n + 1);
            (1..=n).rev().map(|k| k * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(T, 0, -T/n): ceil((0 − T)/step) values; numpy computes the first two, then
            // fills start + i·delta with delta = (start + step) − start.
            let start = t as f64;
            let step = -(t as f64 / n as f64);
            let len = ((0.0 - start) / step).ceil() as i64;
            let second = start + step;
            let delta = second - start;
            (0..len)
                .map(|i| {
                    let y = match i {
                        0 => start,
                        1 => second,
                        _ => start + i as f64 * delta,
                    };
                    y.round_ties_even() as i64 - 1
                })
                .collect()
        }
    }
}

/// `(α_t, σ_t, λ_t)` of a sigma, diffusers' `_sigma_to_alpha_sigma_t` then `log α − log σ`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Point {
    pub alpha: f32,
    pub sigma: f32,
    pub lambda: f32,
}

impl Point {
    pub fn of(sigma: f32) -> Result<Self> {
        // `1 / ((sigma**2 + 1) ** 0.5)`: Python's `1 / t` is `t.reciprocal() * 1`.
        let alpha = f32::try_from(
            Tensor::from(sigma).f_pow_tensor_scalar(2)?.f_add_scalar(1)?.f_pow_tensor_scalar(0.5)?.f_reciprocal()?,
        )?;
        let sigma = sigma * alpha;
        let lambda = log32(alpha)? - log32(sigma)?;
        Ok(Self { alpha, sigma, lambda })
    }
}

fn unary32(x: f32, op: impl Fn(&Tensor) -> Result<Tensor, tch::TchError>) -> Result<f32> {
    Ok(f32::try_from(op(&Tensor::from(x))?)?)
}

pub(super) fn log32(x: f32) -> Result<f32> {
    unary32(x, Tensor::f_log)
}

pub(super) fn exp32(x: f32) -> Result<f32> {
    unary32(x, Tensor::f_exp)
}

pub(super) fn expm1_32(x: f32) -> Result<f32> {
    unary32(x, Tensor::f_expm1)
}
