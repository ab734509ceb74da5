//! UniPC multistep (Zhao et al. 2023), after diffusers 0.42 `UniPCMultistepScheduler` with
//! `solver_type="bh2"`, `predict_x0=True`, the corrector on every step (`disable_corrector=[]`),
//! `final_sigmas_type="zero"`, no thresholding, no Karras/exponential/beta/flow sigmas, no
//! `solver_p`; orders 1 and 2.
//!
//! diffusers behaviour reproduced:
//! - Each step first corrects the sample it is given (UniC), from the sample before the previous
//!   step (`last_sample`), the previous data predictions and this step's one, with the order the
//!   previous predictor used; the data prediction itself is taken from the uncorrected sample.
//!   Then it predicts (UniP) from the corrected sample, which it keeps as the next `last_sample`.
//! - The predictor's order is `min(solver_order, steps left)` with `lower_order_final` (so the
//!   last step is first order), and at most the number of steps run so far plus one.
//! - Order 2 predictor weights are fixed to 1/2; the corrector's come from `linalg.solve` on a
//!   float32 2×2 system, run here through libtorch too.
//! - No float32 upcast: the update runs in the sample's dtype.
//!
//! Refused (by `SchedulerConfig::check_applies_to`): `lower_order_final = false` with order 2.
//! The last step then lands on sigma 0, where λ is infinite and diffusers' `(m1 − m0) / r1`
//! divides by zero: its result is inf/NaN.
use super::multistep::{expm1_32, Multistep, Point};
use super::{NoiseSchedule, PredictionType, Scheduler, SchedulerConfig, SchedulerKind};
use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

pub use super::multistep::{
    MULTISTEP_LOWER_ORDER_FINAL as UNIPC_LOWER_ORDER_FINAL, MULTISTEP_SOLVER_ORDER as UNIPC_SOLVER_ORDER,
    MULTISTEP_STEPS_OFFSET as UNIPC_STEPS_OFFSET,
};

#[derive(Debug)]
pub struct UniPcScheduler {
    m: Multistep,
    /// The sample the last predictor started from (after its correction).
    last_sample: Option<Tensor>,
    /// The order the last predictor used, which the next corrector uses.
    this_order: usize,
}

/// The coefficients both UniP and UniC derive from a step `s0 → t` (`predict_x0`, bh2).
struct Bh {
    /// `σ_t / σ_s0`
    c_sample: f32,
    /// `α_t · h·φ1(h)`
    c_m0: f32,
    /// `α_t · B(h)`
    c_res: f32,
    /// `h·φ_k` then `b_k` for k = 1, 2 (diffusers' `b` list)
    b: [f32; 2],
    h: f32,
}

impl Bh {
    fn new(t: Point, s0: Point) -> Result<Self> {
        let h = t.lambda - s0.lambda;
        let hh = -h;
        let h_phi_1 = expm1_32(hh)?;
        let b_h = expm1_32(hh)?;
        // diffusers' loop: b_i = h_phi_k * i! / B_h, then h_phi_k = h_phi_k / hh − 1/(i+1)!.
        let h_phi_k1 = h_phi_1 / hh - 1.0;
        let b1 = h_phi_k1 * 1.0 / b_h;
        let h_phi_k2 = h_phi_k1 / hh - 0.5;
        let b2 = h_phi_k2 * 2.0 / b_h;
        Ok(Self { c_sample: t.sigma / s0.sigma, c_m0: t.alpha * h_phi_1, c_res: t.alpha * b_h, b: [b1, b2], h })
    }
}

impl UniPcScheduler {
    /// diffusers' constructor: the timesteps are `T-1..0` and `num_inference_steps` is `None`
    /// until `set_timesteps`, before which `step` fails.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        Ok(Self { m: Multistep::new(cfg, SchedulerKind::UniPc)?, last_sample: None, this_order: 0 })
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

    /// `(λ_si − λ_s0) / h`: where the older point lies, in units of the step.
    fn rk(&self, older: usize, s0: Point, h: f32) -> Result<f32> {
        Ok((self.m.point(older)?.lambda - s0.lambda) / h)
    }

    /// `multistep_uni_p_bh_update`: from `sample` at step i to step i+1, with the newest data
    /// prediction (already stored) and, at order 2, the one before.
    fn predict(&self, sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.m.step_index;
        let (t, s0) = (self.m.point(i + 1)?, self.m.point(i)?);
        let bh = Bh::new(t, s0)?;
        let m0 = self.m.model_output(0)?;
        let x_t = sample * f64::from(bh.c_sample) - m0 * f64::from(bh.c_m0);
        if order == 1 {
            // diffusers subtracts `α_t·B_h * 0`, a zero.
            return Ok(x_t);
        }
        let older = i.checked_sub(1).context("unipc: an order-2 prediction at the first step")?;
        let rk = self.rk(older, s0, bh.h)?;
        let d1 = (self.m.model_output(1)? - m0) / f64::from(rk);
        // rhos_p = [0.5]; the einsum over one k is a single product.
        let pred_res = d1 * 0.5;
        Ok(x_t - pred_res * f64::from(bh.c_res))
    }

    /// `multistep_uni_c_bh_update`: corrects `this_sample` (step i) from `last_sample` (step i−1)
    /// with the stored data predictions (the newest is step i−1's) and step i's `this_x0`.
    fn correct(&self, this_x0: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.m.step_index;
        let prev = i.checked_sub(1).context("unipc: a correction at the first step")?;
        let (t, s0) = (self.m.point(i)?, self.m.point(prev)?);
        let bh = Bh::new(t, s0)?;
        let m0 = self.m.model_output(0)?;
        let x_t = last_sample * f64::from(bh.c_sample) - m0 * f64::from(bh.c_m0);
        let d1_t = this_x0 - m0;
        let res = if order == 1 {
            // rhos_c = [0.5]; diffusers adds it to `corr_res = 0`.
            d1_t * 0.5
        } else {
            let older = prev.checked_sub(1).context("unipc: an order-2 correction at the second step")?;
            let rk = self.rk(older, s0, bh.h)?;
            let d1 = (self.m.model_output(1)? - m0) / f64::from(rk);
            let rhos = solve_2x2(rk, bh.b)?;
            d1 * f64::from(rhos[0]) + d1_t * f64::from(rhos[1])
        };
        Ok(x_t - res * f64::from(bh.c_res))
    }
}

/// `torch.linalg.solve(R, b)` with `R = [rk^0; rk^1] = [[1, 1], [rk, 1]]`, in float32 on the
/// CPU as diffusers runs it (LAPACK's pivoting decides the rounding).
fn solve_2x2(rk: f32, b: [f32; 2]) -> Result<[f32; 2]> {
    let r = Tensor::from_slice(&[1.0f32, 1.0, rk, 1.0]).f_view([2, 2])?;
    let b = Tensor::from_slice(&b);
    let x = Tensor::f_linalg_solve(&r, &b, true)?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?;
    let v = Vec::<f32>::try_from(&x)?;
    ensure!(
        v.len() == 2 && v.iter().all(|x| x.is_finite()),
        "unipc: the corrector's 2×2 system (r = {rk}) has no finite solution: {v:?}"
    );
    Ok([v[0], v[1]])
}

impl Scheduler for UniPcScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::UniPc
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
        self.m.set_timesteps(num_inference_steps)?;
        self.last_sample = None;
        self.this_order = 0;
        Ok(())
    }

    fn step(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let model_output = self.m.begin_step(model_output, timestep, sample)?;
        let i = self.m.step_index;
        let x0 = self.m.data_prediction(&model_output, sample)?;
        let sample = match (&self.last_sample, i > 0) {
            (Some(last), true) => self.correct(&x0, last, self.this_order)?,
            _ => sample.shallow_clone(),
        };
        self.m.push_model_output(&x0);
        let n = self.m.timesteps.len();
        let order = if self.m.lower_order_final { self.m.solver_order.min(n - i) } else { self.m.solver_order };
        self.this_order = order.min(self.m.lower_order_nums + 1);
        let prev = self.predict(&sample, self.this_order)?;
        self.last_sample = Some(sample);
        self.m.end_step();
        Ok((prev, Some(x0)))
    }
}
