//! Noise schedulers: DDPM, DDIM, PNDM after MONAI 1.6.1 `monai/networks/schedulers` and
//! monai-generative 0.2.3 `generative/networks/schedulers`; DPM-Solver++ and UniPC (multistep)
//! after diffusers 0.42. They know nothing about networks: a sampling loop calls the model, then
//! `step` with its output (diffusers style).
//!
//! Numerics follow PyTorch exactly: MONAI indexes float32 tensors, so every coefficient is a
//! float32 0-d tensor. Here the coefficients are `f32` scalars computed in the same order (+, −,
//! ×, ÷ round the same in IEEE single precision), except `** 0.5`, which goes through libtorch
//! (`sqrt32`), and every tensor op is the one MONAI applies, in its order. On CPU the results
//! are bit-identical.
//!
//! Where MONAI 1.6.1 and monai-generative 0.2.3 differ, `SchedulerConfig` has a selector
//! whose default is MONAI 1.6.1: `cosine_version`, `timestep_spacing`, `noise_device`, and
//! `DdimScheduler::reversed_step` vs `reversed_step_legacy`.
//!
//! The diffusers samplers (`dpm_solver`, `unipc`) follow diffusers' conventions, which are not
//! MONAI's: their own timestep spacings (see `TimestepSpacing`), `steps_offset` used by the
//! `leading` spacing only, timesteps computed in numpy float64, and sigmas `sqrt((1−ᾱ)/ᾱ)`
//! instead of ᾱ in the update (see `multistep`).
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
mod multistep;
pub mod pndm;
pub mod schedule;
pub mod unipc;

pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver::DpmSolverScheduler;
pub use pndm::PndmScheduler;
pub use schedule::{CosineVersion, NoiseSchedule, Schedule};
pub use unipc::UniPcScheduler;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

/// Which sampler `build` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Ddpm,
    Ddim,
    Pndm,
    /// DPM-Solver++ multistep (diffusers' `DPMSolverMultistepScheduler`). The aliases are
    /// `FromStr`'s, so that a config's `sampling.scheduler_kind` reads the same either way.
    #[serde(
        rename = "dpm-solver++",
        alias = "dpmsolver++",
        alias = "dpm_solver",
        alias = "dpm-solver",
        alias = "dpmpp"
    )]
    DpmSolver,
    /// UniPC multistep (diffusers' `UniPCMultistepScheduler`).
    #[serde(rename = "unipc")]
    UniPc,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [Self::Ddpm, Self::Ddim, Self::Pndm, Self::DpmSolver, Self::UniPc];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::DpmSolver => "dpm-solver++",
            Self::UniPc => "unipc",
        }
    }

    /// The MONAI samplers, whose conventions (spacings, offsets) differ from diffusers'.
    pub fn is_monai(self) -> bool {
        matches!(self, Self::Ddpm | Self::Ddim | Self::Pndm)
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ddpm" => Self::Ddpm,
            "ddim" => Self::Ddim,
            "pndm" => Self::Pndm,
            "dpm-solver++" | "dpmsolver++" | "dpm_solver" | "dpm-solver" | "dpmpp" => Self::DpmSolver,
            "unipc" => Self::UniPc,
            _ => {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                bail!("unknown scheduler {s:?}: use one of {}", names.join(", "))
            }
        })
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the network predicts (MONAI's `DDPMPredictionType`; PNDM takes the first two only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise that was added.
    #[default]
    Epsilon,
    /// The velocity `sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0` (Salimans & Ho 2022).
    VPrediction,
    /// The clean sample x0.
    Sample,
}

impl PredictionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
        }
    }
}

/// DDPM posterior variance (MONAI's `DDPMVarianceType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    #[default]
    FixedSmall,
    FixedLarge,
    Learned,
    LearnedRange,
}

impl VarianceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FixedSmall => "fixed_small",
            Self::FixedLarge => "fixed_large",
            Self::Learned => "learned",
            Self::LearnedRange => "learned_range",
        }
    }
}

/// How DDPM, DDIM and the diffusers samplers spread `n` inference steps over `0..T` (PNDM has
/// only MONAI's `Leading`). The names are the same in MONAI and diffusers but the definitions
/// are not: each variant gives both, MONAI's for DDPM/DDIM, diffusers' for dpm-solver++/unipc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// MONAI >= 1.6 (PR #8623): `linspace(T-1-offset, 0, n)` in float32, rounded half to even,
    /// plus `steps_offset`; the first step is T-1.
    /// diffusers: `linspace(0, T-1, n+1)` in float64, rounded half to even, reversed, the final 0
    /// dropped (`steps_offset` unused); the first step is T-1.
    #[default]
    Linspace,
    /// monai-generative 0.2 and MONAI <= 1.5: `arange(n) * (T // n)` reversed, plus `steps_offset`
    /// (DDIM). The reference repo's 200 DDIM steps are `995, 990, ..., 0`.
    /// diffusers: `arange(1, n+1) * (T // (n+1))` reversed, plus `steps_offset`; never 0.
    Leading,
    /// diffusers only (Lin et al. 2024, table 2): `round(arange(T, 0, -T/n)) − 1` in float64
    /// (`steps_offset` unused); the first step is T-1, the last `T/n − 1`.
    Trailing,
}

/// Where DDPM and DDIM draw their noise. Both use the global torch generator, so with a
/// seeded CPU run they agree; on CUDA they give different (both valid) noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseDevice {
    /// MONAI >= 1.4: `randn(..., device=model_output.device)`.
    #[default]
    ModelOutput,
    /// monai-generative 0.2: `randn(...)` on the CPU generator, then `.to(device)`.
    Cpu,
}

/// Scheduler parameters, named as MONAI's constructor arguments and the reference YAML's
/// `scheduler:` section. `None` means "this scheduler's MONAI default" (diffusers' for
/// dpm-solver++ and unipc): the defaults differ by scheduler (DDIM `set_alpha_to_one=True`, PNDM
/// `False`), so each constructor resolves them from constants next to it
/// (`ddim::DDIM_SET_ALPHA_TO_ONE`, `pndm::PNDM_SET_ALPHA_TO_ONE`, `dpm_solver::DPM_SOLVER_ORDER`, ...);
/// the medgen-only selectors default to MONAI 1.6.1's behaviour. Setting a field the chosen
/// scheduler or schedule does not take is an error, as it is in MONAI (where the extra keyword
/// reaches the schedule function and raises a `TypeError`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// `linear_beta`, `scaled_linear_beta`, `sigmoid_beta` or `cosine`.
    pub schedule: Schedule,
    pub num_train_timesteps: i64,
    /// Beta schedules only (default 1e-4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    /// Beta schedules only (default 2e-2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    /// `sigmoid_beta` only (default 6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig_range: Option<f64>,
    /// `cosine` only: the smoothing offset (default 8e-3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s: Option<f64>,
    /// `cosine` only (default `monai-1.5`, the MONAI 1.6.1 behaviour).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine_version: Option<CosineVersion>,
    /// Default `epsilon`. PNDM takes `epsilon` or `v_prediction`.
    pub prediction_type: PredictionType,
    /// DDPM only (default `fixed_small`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variance_type: Option<VarianceType>,
    /// DDPM and DDIM (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    /// DDPM and DDIM (default -1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample_min: Option<f64>,
    /// DDPM and DDIM (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample_max: Option<f64>,
    /// DDIM (default true) and PNDM (default false): ᾱ before step 0 is 1, else ᾱ[0].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM and PNDM (default 0); dpm-solver++ and unipc (default 0, and as in diffusers used by
    /// the `leading` spacing only, so refused with the others unless 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_offset: Option<i64>,
    /// PNDM only (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_prk_steps: Option<bool>,
    /// DDIM only: MONAI's `step(..., eta)` argument, the weight of the added noise (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// DDPM and DDIM (default `linspace`, MONAI 1.6.1); dpm-solver++ and unipc (default
    /// `linspace`, diffusers'), which alone take `trailing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// DDPM and DDIM (default `model_output`, MONAI 1.6.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise_device: Option<NoiseDevice>,
    /// dpm-solver++ and unipc: the multistep order, 1 or 2 (default 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    /// dpm-solver++ and unipc (default true): lower the order at the last steps, as diffusers'
    /// `lower_order_final`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            schedule: Schedule::LinearBeta,
            num_train_timesteps: 1000,
            beta_start: None,
            beta_end: None,
            sig_range: None,
            s: None,
            cosine_version: None,
            prediction_type: PredictionType::Epsilon,
            variance_type: None,
            clip_sample: None,
            clip_sample_min: None,
            clip_sample_max: None,
            set_alpha_to_one: None,
            steps_offset: None,
            skip_prk_steps: None,
            eta: None,
            timestep_spacing: None,
            noise_device: None,
            solver_order: None,
            lower_order_final: None,
        }
    }
}

impl SchedulerConfig {
    /// Fails on any field set that `kind` (or the schedule) does not take, naming it.
    pub fn check_applies_to(&self, kind: SchedulerKind) -> Result<()> {
        use SchedulerKind::*;
        let fields: [(&str, bool, &[SchedulerKind]); 14] = [
            ("variance_type", self.variance_type.is_some(), &[Ddpm]),
            ("clip_sample", self.clip_sample.is_some(), &[Ddpm, Ddim]),
            ("clip_sample_min", self.clip_sample_min.is_some(), &[Ddpm, Ddim]),
            ("clip_sample_max", self.clip_sample_max.is_some(), &[Ddpm, Ddim]),
            ("set_alpha_to_one", self.set_alpha_to_one.is_some(), &[Ddim, Pndm]),
            ("steps_offset", self.steps_offset.is_some(), &[Ddim, Pndm, DpmSolver, UniPc]),
            ("skip_prk_steps", self.skip_prk_steps.is_some(), &[Pndm]),
            ("eta", self.eta.is_some(), &[Ddim]),
            ("timestep_spacing", self.timestep_spacing.is_some(), &[Ddpm, Ddim, DpmSolver, UniPc]),
            (
                "timestep_spacing: trailing",
                self.timestep_spacing == Some(TimestepSpacing::Trailing),
                &[DpmSolver, UniPc],
            ),
            ("noise_device", self.noise_device.is_some(), &[Ddpm, Ddim]),
            (
                "prediction_type: sample",
                self.prediction_type == PredictionType::Sample,
                &[Ddpm, Ddim, DpmSolver, UniPc],
            ),
            ("solver_order", self.solver_order.is_some(), &[DpmSolver, UniPc]),
            ("lower_order_final", self.lower_order_final.is_some(), &[DpmSolver, UniPc]),
        ];
        for (name, set, kinds) in fields {
            if set && !kinds.contains(&kind) {
                let takers: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                bail!("scheduler {kind}: `{name}` does not apply (only {} take it)", takers.join(", "));
            }
        }
        ensure!(self.num_train_timesteps > 0, "num_train_timesteps must be positive, got {}", self.num_train_timesteps);
        if let Some(o) = self.steps_offset {
            ensure!(o >= 0, "steps_offset must be >= 0, got {o}");
        }
        if let Some(eta) = self.eta {
            ensure!(eta.is_finite(), "eta must be finite, got {eta}");
        }
        if !kind.is_monai() {
            multistep::check_config(self, kind)?;
        }
        Ok(())
    }
}

/// A sampler over a noise schedule. `timesteps()` is valid from construction (MONAI's
/// defaults: DDPM `T-1..0`, DDIM and PNDM call `set_timesteps(T)` in their constructors;
/// diffusers': dpm-solver++ and unipc list `T-1..0` but cannot `step` before `set_timesteps`).
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;
    /// The betas, alphas and ᾱ, shared by every sampler.
    fn noise_schedule(&self) -> &NoiseSchedule;
    fn prediction_type(&self) -> PredictionType;
    fn num_train_timesteps(&self) -> i64 {
        self.noise_schedule().num_train_timesteps()
    }
    /// MONAI's `num_inference_steps` attribute: `None` for DDPM (and, as in diffusers,
    /// dpm-solver++ and unipc) before `set_timesteps`; for
    /// PNDM with PRK steps, the number of timesteps rather than the `n` asked for (a quirk).
    fn num_inference_steps(&self) -> Option<usize>;
    /// The inference timesteps, in the order to run them.
    fn timesteps(&self) -> &[i64];
    /// Chooses `num_inference_steps` timesteps (and resets any multistep state).
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// One reverse step from `sample` at `timestep`: `(prev_sample, pred_original_sample)`,
    /// the latter `None` where the scheduler does not compute it (PNDM). The multistep samplers
    /// (PNDM, dpm-solver++, unipc) keep state between calls, so they need the timesteps of
    /// `timesteps()` in order; dpm-solver++ and unipc refuse any other.
    fn step(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<(Tensor, Option<Tensor>)>;
    /// `sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε`, one integer timestep per batch element (or a 0-d one).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        self.noise_schedule().add_noise(original, noise, timesteps)
    }
    /// The v-prediction target `sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0`.
    fn get_velocity(&self, sample: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        self.noise_schedule().get_velocity(sample, noise, timesteps)
    }
}

/// Builds the scheduler `kind` from `cfg`, resolving unset fields to its defaults (MONAI's
/// constructor defaults; diffusers' for dpm-solver++ and unipc).
pub fn build(kind: SchedulerKind, cfg: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddpm => Box::new(DdpmScheduler::new(cfg)?),
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(cfg)?),
        SchedulerKind::Pndm => Box::new(PndmScheduler::new(cfg)?),
        SchedulerKind::DpmSolver => Box::new(DpmSolverScheduler::new(cfg)?),
        SchedulerKind::UniPc => Box::new(UniPcScheduler::new(cfg)?),
    })
}

// ---- helpers shared by the samplers ----

/// `n` checked as MONAI's `set_timesteps` does; 0 is refused too (MONAI divides by it).
fn check_num_inference_steps(n: usize, num_train_timesteps: i64) -> Result<i64> {
    let n = i64::try_from(n)?;
    ensure!(n > 0, "num_inference_steps must be positive, got 0");
    ensure!(
        n <= num_train_timesteps,
        "num_inference_steps {n} cannot be larger than num_train_timesteps {num_train_timesteps}: \
         the model was trained for at most {num_train_timesteps} timesteps"
    );
    Ok(n)
}

/// `round(linspace(start, 0, n))` in float32, as `torch.linspace(...).round().long()`.
fn linspace_timesteps(start: i64, n: i64) -> Result<Vec<i64>> {
    let t = Tensor::f_linspace(start, 0i64, n, (Kind::Float, Device::Cpu))?.f_round()?.f_to_kind(Kind::Int64)?;
    Ok(Vec::<i64>::try_from(&t)?)
}

/// `arange(n) * (T // n)`, ascending (the caller reverses).
fn leading_timesteps(num_train_timesteps: i64, n: i64) -> Vec<i64> {
    let ratio = num_train_timesteps / n;
    (0..n).map(|i| i * ratio).collect()
}

fn check_timestep(kind: SchedulerKind, timestep: i64, num_train_timesteps: i64) -> Result<()> {
    ensure!(
        (0..num_train_timesteps).contains(&timestep),
        "{kind} step: timestep {timestep} is out of range [0, {num_train_timesteps})"
    );
    Ok(())
}

fn check_same_shape(what: &str, a: &Tensor, a_name: &str, b: &Tensor, b_name: &str) -> Result<()> {
    ensure!(a.size() == b.size(), "{what}: {a_name} has shape {:?} but {b_name} has shape {:?}", a.size(), b.size());
    Ok(())
}

/// `randn(shape)` as MONAI draws it: on `device`, or on the CPU generator and then moved.
fn draw_noise(like: &Tensor, noise_device: NoiseDevice) -> Result<Tensor> {
    let size = like.size();
    Ok(match noise_device {
        NoiseDevice::ModelOutput => Tensor::f_randn(&size, (like.kind(), like.device()))?,
        NoiseDevice::Cpu => Tensor::f_randn(&size, (like.kind(), Device::Cpu))?.f_to_device(like.device())?,
    })
}

/// `x ** 0.5` on a float32 0-d tensor, the way MONAI gets every scalar square root. libtorch's
/// CPU sqrt is not always the correctly rounded one (`f32::sqrt` differs by an ulp on some
/// inputs), so the coefficients go through libtorch too.
fn sqrt32(x: f32) -> Result<f32> {
    Ok(f32::try_from(Tensor::from(x).f_pow_tensor_scalar(0.5)?)?)
}

/// The three ways of reading x0 (and ε) off the model output, shared by DDIM and DDPM.
/// `sqrt_a`, `sqrt_b` are `sqrt(ᾱ_t)`, `sqrt(1−ᾱ_t)` as f32.
fn pred_original(pred: PredictionType, model_output: &Tensor, sample: &Tensor, sqrt_a: f32, sqrt_b: f32) -> Tensor {
    let (a, b) = (f64::from(sqrt_a), f64::from(sqrt_b));
    match pred {
        PredictionType::Epsilon => (sample - model_output * b) / a,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => sample * a - model_output * b,
    }
}
