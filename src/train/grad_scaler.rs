//! The dynamic loss scaler of mixed-precision training, as `torch.amp.GradScaler` (PyTorch 2.13): `scale` the loss,
//! `unscale_` an optimiser's gradients once per iteration (checking them for inf/NaN), `step` it unless they were
//! not finite, then `update` the scale: backed off after a non-finite iteration, grown after `growth_interval`
//! finite ones in a row. The scale and the growth tracker live on the loss's device, so nothing syncs before `step`.
use super::optim::{meta_parse, snapshot, Optimizer};
use crate::checkpoint::StateDict;
use anyhow::{anyhow, bail, ensure, Result};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Kind, Tensor};

/// `torch.amp.GradScaler`'s constructor arguments and defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
    /// Disabled: `scale` returns the loss, `step` steps, everything else does nothing.
    pub enabled: bool,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000, enabled: true }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Unscaled,
    Stepped,
}

/// What the scaler knows of one optimiser in the current iteration.
struct Record {
    stage: Stage,
    /// Non-zero when a gradient was not finite; None when the optimiser had no gradient to check.
    found_inf: Option<Tensor>,
}

pub struct GradScaler {
    config: GradScalerConfig,
    /// f32 scale and i32 growth tracker, created by the first `scale` on the loss's device; until then (and after
    /// a `load_state` before it) their values wait in `config.init_scale` and `init_growth_tracker`.
    scale: Option<Tensor>,
    growth_tracker: Option<Tensor>,
    init_growth_tracker: i64,
    records: HashMap<u64, Record>,
}

impl GradScaler {
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        if config.enabled {
            ensure!(config.growth_factor > 1.0, "the growth factor must be > 1.0, not {}", config.growth_factor);
            ensure!(config.backoff_factor < 1.0, "the backoff factor must be < 1.0, not {}", config.backoff_factor);
        }
        Ok(Self { config, scale: None, growth_tracker: None, init_growth_tracker: 0, records: HashMap::new() })
    }

    /// The reference's scaler (PyTorch defaults) where the precision needs loss scaling (fp16), a
    /// disabled one otherwise.
    pub fn for_precision(precision: crate::amp::Precision) -> Result<Self> {
        Self::new(GradScalerConfig { enabled: precision.needs_loss_scaling(), ..Default::default() })
    }

    pub fn is_enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn config(&self) -> &GradScalerConfig {
        &self.config
    }

    /// The current scale (a device sync once the scale exists); 1.0 when disabled, as PyTorch.
    pub fn get_scale(&self) -> f64 {
        match (&self.scale, self.config.enabled) {
            (_, false) => 1.0,
            (None, true) => self.config.init_scale,
            (Some(s), true) => s.double_value(&[]),
        }
    }

    /// Finite iterations since the scale last changed; 0 when disabled.
    pub fn growth_tracker(&self) -> i64 {
        match (&self.growth_tracker, self.config.enabled) {
            (_, false) => 0,
            (None, true) => self.init_growth_tracker,
            (Some(t), true) => t.int64_value(&[]),
        }
    }

    /// `loss * scale`.
    pub fn scale(&mut self, loss: &Tensor) -> Result<Tensor> {
        if !self.config.enabled {
            return Ok(loss.shallow_clone());
        }
        let scale = match &self.scale {
            Some(s) => s,
            None => {
                let device = loss.device();
                let s = Tensor::f_full([], self.config.init_scale, (Kind::Float, device))?;
                self.growth_tracker = Some(Tensor::f_full([], self.init_growth_tracker, (Kind::Int, device))?);
                self.scale.insert(s)
            }
        };
        Ok(loss.f_mul(&scale.f_to_device(loss.device())?)?)
    }

    fn initialised(&self, what: &str) -> Result<(&Tensor, &Tensor)> {
        match (&self.scale, &self.growth_tracker) {
            (Some(s), Some(t)) => Ok((s, t)),
            _ => bail!("GradScaler::{what} before any scale(): scale the loss before its backward"),
        }
    }

    /// Divides the optimiser's gradients by the scale in place and records whether any was inf or NaN. At most once
    /// per optimiser between `update`s, and before its `step` (which unscales by itself otherwise): call it to clip
    /// or inspect true gradients.
    pub fn unscale_<O: Optimizer>(&mut self, opt: &mut O) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let (scale, _) = self.initialised("unscale_")?;
        match self.records.get(&opt.id()).map(|r| r.stage) {
            Some(Stage::Unscaled) => {
                bail!("unscale_() has already been called on this optimizer since the last update()")
            }
            Some(Stage::Stepped) => bail!("unscale_() is being called after step()"),
            _ => {}
        }
        let _guard = tch::no_grad_guard();
        // PyTorch inverts in double and rounds to float once.
        let inv_scale = scale.f_to_kind(Kind::Double)?.f_reciprocal()?.f_to_kind(Kind::Float)?;
        // As PyTorch's `_unscale_grads_`: per device, a found-inf flag and the inverse scale, and one call of
        // libtorch's `_amp_foreach_non_finite_check_and_unscale_` over that device's gradients (through the shim:
        // tch does not bind the list form). It flags a non-finite value before multiplying, so a finite value the
        // multiply overflows is no inf. Nothing is read back and nothing is copied per gradient.
        let mut per_device: Vec<(Device, Vec<Tensor>)> = Vec::new();
        for g in opt.grads()? {
            ensure!(g.kind() != Kind::Half, "Attempting to unscale FP16 gradients.");
            let device = g.device();
            match per_device.iter_mut().find(|(d, _)| *d == device) {
                Some((_, gs)) => gs.push(g),
                None => per_device.push((device, vec![g])),
            }
        }
        let mut flags = Vec::with_capacity(per_device.len());
        for (device, grads) in &per_device {
            let found = Tensor::f_zeros([], (Kind::Float, *device))?;
            foreach_unscale(grads, &found, &inv_scale.f_to_device(*device)?)?;
            flags.push(found);
        }
        let mut found_inf: Option<Tensor> = None;
        for found in flags {
            let found = found.f_to_device(scale.device())?;
            found_inf = Some(match found_inf {
                None => found,
                Some(f) => f.f_add(&found)?,
            });
        }
        self.records.insert(opt.id(), Record { stage: Stage::Unscaled, found_inf });
        Ok(())
    }

    /// Unscales (unless `unscale_` did) and steps the optimiser unless a gradient was inf or NaN. Returns whether it
    /// stepped. Syncs with the device once, to read the inf flag.
    pub fn step<O: Optimizer>(&mut self, opt: &mut O) -> Result<bool> {
        if !self.config.enabled {
            opt.step()?;
            return Ok(true);
        }
        self.initialised("step")?;
        match self.records.get(&opt.id()).map(|r| r.stage) {
            Some(Stage::Stepped) => bail!("step() has already been called since the last update()"),
            Some(Stage::Unscaled) => {}
            None => self.unscale_(opt)?,
        }
        let record = self.records.get_mut(&opt.id()).expect("recorded by unscale_");
        let found_inf = record.found_inf.as_ref().ok_or_else(|| {
            anyhow!("no inf checks were recorded for this optimizer: none of its parameters has a gradient")
        })?;
        let finite = found_inf.f_double_value(&[])? == 0.0;
        if finite {
            opt.step()?;
        }
        record.stage = Stage::Stepped;
        Ok(finite)
    }

    /// Ends the iteration: the scale times `backoff_factor` if any optimiser saw an inf/NaN, else the growth tracker
    /// counts one more, and at `growth_interval` the scale grows by `growth_factor` (when that stays finite).
    pub fn update(&mut self) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let (scale, tracker) = self.initialised("update")?;
        let mut combined: Option<Tensor> = None;
        for r in self.records.values() {
            if let Some(f) = &r.found_inf {
                let f = f.f_to_device(scale.device())?;
                combined = Some(match combined {
                    None => f,
                    Some(c) => c.f_add(&f)?,
                });
            }
        }
        let combined = combined.ok_or_else(|| anyhow!("no inf checks were recorded prior to update()"))?;
        let mut scale = scale.shallow_clone();
        let _ = scale.f_internal_amp_update_scale_(
            tracker,
            &combined,
            self.config.growth_factor,
            self.config.backoff_factor,
            self.config.growth_interval,
        )?;
        self.records.clear();
        Ok(())
    }

    /// Writes `{prefix}.scale` (0-d f32) and `{prefix}.growth_tracker` (0-d i32), and the metadata
    /// `{prefix}.growth_factor`, `.backoff_factor`, `.growth_interval`, `.enabled` in `sd.metadata`. A disabled
    /// scaler writes only `.enabled`. Between `update`s the iteration's inf checks would be lost, so that is an error.
    pub fn save_state(&self, sd: &mut StateDict, prefix: &str) -> Result<()> {
        sd.metadata.insert(format!("{prefix}.enabled"), self.config.enabled.to_string());
        if !self.config.enabled {
            return Ok(());
        }
        ensure!(self.records.is_empty(), "save the GradScaler's state after update(), not within an iteration");
        let scale = match &self.scale {
            Some(s) => snapshot(s)?,
            None => Tensor::from_slice(&[self.config.init_scale as f32]).reshape([]),
        };
        let tracker = match &self.growth_tracker {
            Some(t) => snapshot(t)?,
            None => Tensor::from_slice(&[self.init_growth_tracker as i32]).reshape([]),
        };
        sd.insert(format!("{prefix}.scale"), scale);
        sd.insert(format!("{prefix}.growth_tracker"), tracker);
        let c = &self.config;
        sd.metadata.insert(format!("{prefix}.growth_factor"), c.growth_factor.to_string());
        sd.metadata.insert(format!("{prefix}.backoff_factor"), c.backoff_factor.to_string());
        sd.metadata.insert(format!("{prefix}.growth_interval"), c.growth_interval.to_string());
        Ok(())
    }

    /// Restores what [`GradScaler::save_state`] wrote, hyper-parameters included (as PyTorch). A disabled scaler
    /// ignores it; an enabled one refuses a state saved by a disabled one.
    pub fn load_state(&mut self, sd: &StateDict, prefix: &str) -> Result<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let enabled: bool = meta_parse(sd, prefix, "enabled")?;
        ensure!(enabled, "the GradScaler state under {prefix:?} was saved from a disabled scaler: it holds no scale");
        let scalar = |name: &str| -> Result<&Tensor> {
            let key = format!("{prefix}.{name}");
            let t = sd.get(&key).ok_or_else(|| anyhow!("GradScaler state {key} is missing"))?;
            ensure!(t.numel() == 1, "GradScaler state {key} has shape {:?}; expected a scalar", t.size());
            Ok(t)
        };
        let scale = scalar("scale")?.f_double_value(&[])?;
        let tracker = scalar("growth_tracker")?.f_double_value(&[])?;
        ensure!(
            tracker >= 0.0 && tracker.fract() == 0.0 && tracker <= f64::from(i32::MAX),
            "GradScaler state {prefix}.growth_tracker is {tracker}, not a count"
        );
        let config = GradScalerConfig {
            init_scale: f64::from(scale as f32),
            growth_factor: meta_parse(sd, prefix, "growth_factor")?,
            backoff_factor: meta_parse(sd, prefix, "backoff_factor")?,
            growth_interval: meta_parse(sd, prefix, "growth_interval")?,
            enabled: true,
        };
        self.config = config;
        self.init_growth_tracker = tracker as i64;
        if let Some(s) = &mut self.scale {
            let _ = s.f_fill_(config.init_scale)?;
        }
        if let Some(t) = &mut self.growth_tracker {
            let _ = t.f_fill_(self.init_growth_tracker)?;
        }
        Ok(())
    }

    /// The device the scale lives on, once `scale` has run.
    pub fn device(&self) -> Option<Device> {
        self.scale.as_ref().map(Tensor::device)
    }
}

extern "C" {
    fn medgen_amp_unscale(
        grads: *mut *mut c_void,
        n: c_int,
        found_inf: *mut c_void,
        inv_scale: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// `torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)`: every tensor on one device.
fn foreach_unscale(grads: &[Tensor], found_inf: &Tensor, inv_scale: &Tensor) -> Result<()> {
    let mut ptrs: Vec<*mut c_void> = grads.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let n = c_int::try_from(ptrs.len()).map_err(|_| anyhow!("{} gradients in one unscale", ptrs.len()))?;
    let mut err = vec![0 as c_char; 1024];
    // SAFETY: the handles are tch's live at::Tensor pointers, borrowed for the call; the shim copies the handles
    // (not the data) into a TensorList and writes at most `err.len()` bytes, NUL-terminated, into `err`.
    let rc = unsafe {
        medgen_amp_unscale(
            ptrs.as_mut_ptr(),
            n,
            found_inf.as_ptr() as *mut c_void,
            inv_scale.as_ptr() as *mut c_void,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        bail!("unscaling the gradients: {msg}");
    }
    Ok(())
}
