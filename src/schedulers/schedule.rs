//! Beta schedules and the shared `add_noise` / `get_velocity` (MONAI's base `Scheduler`).
//! Everything is built in float32 on the CPU with the same libtorch ops as MONAI, so the
//! tables are bit-identical to PyTorch's.
use super::SchedulerConfig;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::sync::{Mutex, PoisonError};
use tch::{Device, Kind, Tensor};

/// MONAI's `NoiseSchedules` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    LinearBeta,
    /// Linear in sqrt(beta), then squared (the LDM schedule).
    ScaledLinearBeta,
    SigmoidBeta,
    /// Nichol & Dhariwal 2021, from ᾱ(t) = cos²(((t/T)+s)/(1+s)·π/2).
    Cosine,
}

impl Schedule {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LinearBeta => "linear_beta",
            Self::ScaledLinearBeta => "scaled_linear_beta",
            Self::SigmoidBeta => "sigmoid_beta",
            Self::Cosine => "cosine",
        }
    }
}

/// The two cosine schedules. They differ by up to 1.6e-3 in ᾱ, so a model must be sampled
/// with the one it was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CosineVersion {
    /// MONAI >= 1.5: betas from the ratio of consecutive ᾱ, clipped to [0, 0.999], then
    /// ᾱ = cumprod(1 − β), so ᾱ[0] < 1.
    #[default]
    #[serde(rename = "monai-1.5")]
    Monai15,
    /// monai-generative 0.2 and MONAI <= 1.4: alphas (the ratios) clipped to [1e-4, 0.9999] and
    /// ᾱ taken from the cosine directly, so ᾱ[0] == 1 and ᾱ != cumprod(alphas).
    #[serde(rename = "legacy")]
    Legacy,
}

/// betas, alphas and ᾱ (`alphas_cumprod`) for `num_train_timesteps` steps; the tensors are
/// built on the CPU in float32, with f32 copies for the per-step scalar arithmetic. ᾱ goes to
/// each device (and dtype) `add_noise` meets once, and stays there: no copy per training step.
#[derive(Debug)]
pub struct NoiseSchedule {
    num_train_timesteps: i64,
    betas: Tensor,
    alphas: Tensor,
    alphas_cumprod: Tensor,
    betas_v: Vec<f32>,
    alphas_v: Vec<f32>,
    alphas_cumprod_v: Vec<f32>,
    alphas_cumprod_on: Mutex<Vec<(Device, Kind, Tensor)>>,
}

impl NoiseSchedule {
    /// The schedule part of `cfg`; refuses schedule arguments the schedule does not take.
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let t = cfg.num_train_timesteps;
        ensure!(t > 0, "num_train_timesteps must be positive, got {t}");
        let schedule = cfg.schedule;
        let args: [(&str, bool, &[Schedule]); 5] = [
            (
                "beta_start",
                cfg.beta_start.is_some(),
                &[Schedule::LinearBeta, Schedule::ScaledLinearBeta, Schedule::SigmoidBeta],
            ),
            (
                "beta_end",
                cfg.beta_end.is_some(),
                &[Schedule::LinearBeta, Schedule::ScaledLinearBeta, Schedule::SigmoidBeta],
            ),
            ("sig_range", cfg.sig_range.is_some(), &[Schedule::SigmoidBeta]),
            ("s", cfg.s.is_some(), &[Schedule::Cosine]),
            ("cosine_version", cfg.cosine_version.is_some(), &[Schedule::Cosine]),
        ];
        for (name, set, takers) in args {
            if set && !takers.contains(&schedule) {
                bail!("schedule {}: `{name}` does not apply to it", schedule.as_str());
            }
        }
        let beta_start = cfg.beta_start.unwrap_or(1e-4);
        let beta_end = cfg.beta_end.unwrap_or(2e-2);
        let opts = (Kind::Float, Device::Cpu);
        let (betas, alphas, alphas_cumprod) = match schedule {
            Schedule::LinearBeta => from_betas(Tensor::f_linspace(beta_start, beta_end, t, opts)?)?,
            Schedule::ScaledLinearBeta => {
                // Python's `x ** 0.5` on a float is C pow, not sqrt: use the same libm call.
                let sqrt_range = Tensor::f_linspace(beta_start.powf(0.5), beta_end.powf(0.5), t, opts)?;
                from_betas(sqrt_range.f_pow_tensor_scalar(2i64)?)?
            }
            Schedule::SigmoidBeta => {
                let r = cfg.sig_range.unwrap_or(6.0);
                let x = Tensor::f_linspace(-r, r, t, opts)?;
                from_betas(x.f_sigmoid()? * (beta_end - beta_start) + beta_start)?
            }
            Schedule::Cosine => cosine(t, cfg.s.unwrap_or(8e-3), cfg.cosine_version.unwrap_or_default())?,
        };
        let v = |x: &Tensor| -> Result<Vec<f32>> { Ok(Vec::<f32>::try_from(x)?) };
        Ok(Self {
            num_train_timesteps: t,
            betas_v: v(&betas)?,
            alphas_v: v(&alphas)?,
            alphas_cumprod_v: v(&alphas_cumprod)?,
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_on: Mutex::new(Vec::new()),
        })
    }

    pub fn num_train_timesteps(&self) -> i64 {
        self.num_train_timesteps
    }

    pub fn betas(&self) -> &Tensor {
        &self.betas
    }

    pub fn alphas(&self) -> &Tensor {
        &self.alphas
    }

    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    fn at(&self, table: &[f32], name: &str, t: i64) -> Result<f32> {
        // Python would wrap a negative index around; a negative timestep is a caller bug here.
        usize::try_from(t).ok().and_then(|i| table.get(i)).copied().with_context(|| {
            format!("timestep {t} is out of range for {name} (num_train_timesteps {})", self.num_train_timesteps)
        })
    }

    /// ᾱ_t as MONAI's `alphas_cumprod[t]` (a float32 value).
    pub fn alpha_cumprod_at(&self, t: i64) -> Result<f32> {
        self.at(&self.alphas_cumprod_v, "alphas_cumprod", t)
    }

    pub fn alpha_at(&self, t: i64) -> Result<f32> {
        self.at(&self.alphas_v, "alphas", t)
    }

    pub fn beta_at(&self, t: i64) -> Result<f32> {
        self.at(&self.betas_v, "betas", t)
    }

    /// `sqrt(ᾱ_t)·original + sqrt(1−ᾱ_t)·noise`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (sqrt_a, sqrt_b) = self.sqrt_alphas("add_noise", original, "original", noise, timesteps)?;
        Ok(sqrt_a * original + sqrt_b * noise)
    }

    /// `sqrt(ᾱ_t)·noise − sqrt(1−ᾱ_t)·sample`, the v-prediction target.
    pub fn get_velocity(&self, sample: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (sqrt_a, sqrt_b) = self.sqrt_alphas("get_velocity", sample, "sample", noise, timesteps)?;
        Ok(sqrt_a * noise - sqrt_b * sample)
    }

    /// `sqrt(ᾱ[t])` and `sqrt(1−ᾱ[t])`, shaped `[B, 1, ...]` to broadcast over `x`. As in MONAI,
    /// ᾱ is cast to `x`'s dtype first, so half-precision inputs get half-precision arithmetic.
    /// (MONAI also keeps that cast for later `step` calls; medgen does not mutate the schedule.)
    fn sqrt_alphas(
        &self,
        op: &str,
        x: &Tensor,
        x_name: &str,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        super::check_same_shape(op, x, x_name, noise, "noise")?;
        ensure!(x.is_floating_point(), "{op}: {x_name} must be a floating-point tensor, got {:?}", x.kind());
        ensure!(noise.kind() == x.kind(), "{op}: noise is {:?} but {x_name} is {:?}", noise.kind(), x.kind());
        let idx = self.check_timesteps(op, x, timesteps)?;
        let dev = x.device();
        let ac = self.alphas_cumprod_on(dev, x.kind())?;
        let a = ac.f_index_select(0, &idx.f_to_device(dev)?)?;
        let mut shape = vec![a.size()[0]];
        shape.resize(x.dim().max(1), 1);
        let sqrt_a = a.f_pow_tensor_scalar(0.5)?.f_view(shape.as_slice())?;
        let sqrt_b = (1f64 - &a).f_pow_tensor_scalar(0.5)?.f_view(shape.as_slice())?;
        Ok((sqrt_a, sqrt_b))
    }

    /// ᾱ on `device` in `kind` (the CPU float32 table itself, or its copy made by the first call for that pair).
    fn alphas_cumprod_on(&self, device: Device, kind: Kind) -> Result<Tensor> {
        if device == Device::Cpu && kind == Kind::Float {
            return Ok(self.alphas_cumprod.shallow_clone());
        }
        let mut copies = self.alphas_cumprod_on.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, _, t)) = copies.iter().find(|(d, k, _)| *d == device && *k == kind) {
            return Ok(t.shallow_clone());
        }
        let t = self.alphas_cumprod.f_to_device(device)?.f_to_kind(kind)?;
        copies.push((device, kind, t.shallow_clone()));
        Ok(t)
    }

    /// Integer timesteps, one per batch element (or one for all), flattened. Their values are checked to be in
    /// `[0, T)` when they are on the CPU; on another device reading them would stop the device at every step, so
    /// check them before moving them there (the trainer draws them in range on the CPU).
    fn check_timesteps(&self, op: &str, x: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let k = timesteps.kind();
        ensure!(
            matches!(k, Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8),
            "{op}: timesteps must be an integer tensor (int64), got {k:?}"
        );
        ensure!(timesteps.dim() <= 1, "{op}: timesteps must be 0-d or 1-d, got shape {:?}", timesteps.size());
        let flat = timesteps.f_reshape([-1])?.f_to_kind(Kind::Int64)?;
        let n = flat.size()[0];
        if timesteps.dim() == 1 {
            let batch = x.size().first().copied().unwrap_or(1);
            ensure!(n == batch || n == 1, "{op}: {n} timesteps for a batch of {batch}");
        }
        if flat.device() != Device::Cpu {
            return Ok(flat);
        }
        let values = Vec::<i64>::try_from(&flat)?;
        let t_max = self.num_train_timesteps;
        if let Some(bad) = values.iter().find(|&&t| !(0..t_max).contains(&t)) {
            bail!("{op}: timestep {bad} is out of range [0, {t_max})");
        }
        Ok(flat)
    }
}

/// `alphas = 1 − betas`, `ᾱ = cumprod(alphas)`.
fn from_betas(betas: Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let alphas = 1f64 - &betas;
    let alphas_cumprod = alphas.f_cumprod(0, Kind::Float)?;
    Ok((betas, alphas, alphas_cumprod))
}

fn cosine(t: i64, s: f64, version: CosineVersion) -> Result<(Tensor, Tensor, Tensor)> {
    let x = Tensor::f_linspace(0i64, t, t + 1, (Kind::Float, Device::Cpu))?;
    // The op sequence of MONAI's formula; each op rounds to float32 as PyTorch's does.
    let ac = (((x / t) + s) / (1.0 + s) * PI * 0.5).f_cos()?.f_pow_tensor_scalar(2i64)?;
    let ac0 = f64::from(f32::try_from(ac.get(0))?);
    let ac = ac / ac0;
    let ratio = ac.slice(0, 1, None, 1) / ac.slice(0, 0, Some(t), 1);
    Ok(match version {
        CosineVersion::Monai15 => {
            let betas = (1f64 - ratio).f_clamp(0.0, 0.999)?;
            let alphas = 1f64 - &betas;
            let alphas_cumprod = alphas.f_cumprod(0, Kind::Float)?;
            (betas, alphas, alphas_cumprod)
        }
        CosineVersion::Legacy => {
            let alphas = ratio.f_clamp(0.0001, 0.9999)?;
            let betas = 1f64 - &alphas;
            (betas, alphas, ac.slice(0, 0, Some(t), 1).contiguous())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ᾱ is cast (and, on a GPU, moved) once per device and dtype, not at every `add_noise`; the float32 CPU table
    /// is used as it is.
    #[test]
    fn the_table_is_copied_once_per_device_and_dtype() {
        let s = NoiseSchedule::from_config(&SchedulerConfig::default()).unwrap();
        let t = Tensor::from_slice(&[3i64, 999]);
        let copies = || s.alphas_cumprod_on.lock().unwrap().len();
        let x = Tensor::ones([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        let _ = s.add_noise(&x, &x, &t).unwrap();
        assert_eq!(copies(), 0);
        let h = x.to_kind(Kind::Half);
        let first = s.add_noise(&h, &h, &t).unwrap();
        let second = s.add_noise(&h, &h, &t).unwrap();
        assert_eq!(copies(), 1);
        assert!(first.equal(&second));
        assert_eq!(first.kind(), Kind::Half);
    }
}
