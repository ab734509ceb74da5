//! Adam and AdamW as `torch.optim.Adam`/`AdamW` of PyTorch 2.13, with per-parameter state that a checkpoint saves
//! and restores bit-exactly (tch's optimisers cannot), and `clip_grad_norm` as `torch.nn.utils.clip_grad_norm_`.
//!
//! The update follows PyTorch's single-tensor path (its default on CPU) op for op, so on CPU the parameters are
//! bit-identical to PyTorch's for f32. On CUDA PyTorch defaults to its foreach kernels, which round a few steps
//! differently; there the two agree to a few ulp.
//!
//! Gradients follow `zero_grad(set_to_none=True)`, PyTorch's default: tch cannot unset a gradient, so `zero_grad`
//! zeroes it and remembers its version counter; a gradient that no backward has touched since is treated as absent
//! (the parameter is skipped by `step`, the scaler and clipping, as PyTorch skips a `None` grad).
use crate::checkpoint::StateDict;
use anyhow::{anyhow, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// What `GradScaler` needs from an optimiser.
pub trait Optimizer {
    /// Distinguishes optimisers within one iteration of a scaler (PyTorch keys them by `id()`).
    fn id(&self) -> u64;
    /// The gradients `step` would use: of parameters that require grad and whose gradient a backward has written
    /// since the last `zero_grad`.
    fn grads(&self) -> Result<Vec<Tensor>>;
    fn step(&mut self) -> Result<()>;
    fn zero_grad(&mut self);
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Hyper-parameters, with `torch.optim.Adam`'s defaults through [`AdamConfig::adam`] and `AdamW`'s through
/// [`AdamConfig::adamw`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    /// AdamW: `param *= 1 - lr * weight_decay` before the update, instead of adding `weight_decay * param` to the
    /// gradient (Adam's L2 penalty).
    pub decoupled_weight_decay: bool,
}

impl AdamConfig {
    pub fn adam(lr: f64) -> Self {
        Self { lr, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0, amsgrad: false, decoupled_weight_decay: false }
    }

    pub fn adamw(lr: f64) -> Self {
        Self { weight_decay: 1e-2, decoupled_weight_decay: true, ..Self::adam(lr) }
    }

    pub fn betas(self, beta1: f64, beta2: f64) -> Self {
        Self { betas: (beta1, beta2), ..self }
    }

    pub fn eps(self, eps: f64) -> Self {
        Self { eps, ..self }
    }

    pub fn weight_decay(self, weight_decay: f64) -> Self {
        Self { weight_decay, ..self }
    }

    pub fn amsgrad(self, amsgrad: bool) -> Self {
        Self { amsgrad, ..self }
    }

    /// The name the state is saved under: the two update rules differ, so a state does not move between them.
    pub fn algorithm(&self) -> &'static str {
        if self.decoupled_weight_decay {
            "adamw"
        } else {
            "adam"
        }
    }

    /// The checks of PyTorch's constructor.
    pub fn validate(&self) -> Result<()> {
        let (b1, b2) = self.betas;
        ensure!(self.lr >= 0.0, "invalid learning rate {}", self.lr);
        ensure!(self.eps >= 0.0, "invalid epsilon {}", self.eps);
        ensure!((0.0..1.0).contains(&b1), "invalid beta1 {b1}: must be in [0, 1)");
        ensure!((0.0..1.0).contains(&b2), "invalid beta2 {b2}: must be in [0, 1)");
        ensure!(self.weight_decay >= 0.0, "invalid weight_decay {}", self.weight_decay);
        Ok(())
    }
}

/// PyTorch's per-parameter state. `step` is a float32 counter there, and so here: past 2^24 it stops counting in
/// both.
struct ParamState {
    step: f32,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Option<Tensor>,
}

struct Param {
    name: String,
    tensor: Tensor,
    state: Option<ParamState>,
    /// The gradient's storage and version counter right after `zero_grad`: unchanged means no backward since.
    zeroed: Option<(usize, i64)>,
}

impl Param {
    fn live_grad(&self) -> Result<Option<Tensor>> {
        if !self.tensor.requires_grad() {
            return Ok(None);
        }
        let grad = self.tensor.f_grad()?;
        if !grad.defined() {
            return Ok(None);
        }
        if self.zeroed == Some((grad.data_ptr() as usize, grad.f_internal_version()?)) {
            return Ok(None);
        }
        Ok(Some(grad))
    }
}

/// Adam or AdamW (by [`AdamConfig::decoupled_weight_decay`]) over named parameters, one parameter group.
pub struct Adam {
    config: AdamConfig,
    params: Vec<Param>,
    id: u64,
    /// Room for the update's two intermediates (PyTorch allocates them per parameter and step): reused across
    /// parameters, so a step allocates nothing. Large fresh buffers are page faults and zeroed pages, which cost
    /// as much as the arithmetic on a CPU.
    scratch: Option<Tensor>,
}

/// The trainable variables of a store with their names, in creation order (the order of PyTorch's
/// `model.parameters()` when the model registers them in the same order). Frozen ones are included: `step` checks
/// `requires_grad` each time, so a store can be frozen and unfrozen after the optimiser is built.
pub fn named_trainable_variables(vs: &VarStore) -> Result<Vec<(String, Tensor)>> {
    let vars = vs.variables_.lock().map_err(|_| anyhow!("the variable store's lock is poisoned"))?;
    let mut by_ptr: HashMap<usize, Vec<(&String, &Tensor)>> = HashMap::new();
    for (name, t) in &vars.named_variables {
        by_ptr.entry(t.data_ptr() as usize).or_default().push((name, t));
    }
    let mut out = Vec::with_capacity(vars.trainable_variables.len());
    for var in &vars.trainable_variables {
        let t = &var.tensor;
        let candidates = by_ptr.get(&(t.data_ptr() as usize)).map(Vec::as_slice).unwrap_or(&[]);
        // Same data pointer is not enough for empty tensors; `is_set_to` compares storage, offset, size and stride.
        let mut found = None;
        for (name, named) in candidates {
            if named.f_is_set_to(t)? {
                found = Some((*name).clone());
                break;
            }
        }
        let name =
            found.ok_or_else(|| anyhow!("a trainable variable of shape {:?} has no name in its store", t.size()))?;
        out.push((name, t.shallow_clone()));
    }
    Ok(out)
}

impl Adam {
    /// `params` share storage with the model's variables (a `shallow_clone`, as `VarStore::variables` gives).
    pub fn new(config: AdamConfig, params: Vec<(String, Tensor)>) -> Result<Self> {
        config.validate()?;
        ensure!(!params.is_empty(), "the optimiser got an empty parameter list");
        let mut seen = HashSet::new();
        for (name, t) in &params {
            ensure!(seen.insert(name.as_str()), "parameter {name:?} is given twice");
            ensure!(
                t.is_floating_point(),
                "parameter {name:?} is {:?}; Adam updates floating-point tensors only",
                t.kind()
            );
        }
        let params =
            params.into_iter().map(|(name, tensor)| Param { name, tensor, state: None, zeroed: None }).collect();
        Ok(Self { config, params, id: NEXT_ID.fetch_add(1, Ordering::Relaxed), scratch: None })
    }

    /// Every trainable variable of the store (see [`named_trainable_variables`]).
    pub fn from_var_store(config: AdamConfig, vs: &VarStore) -> Result<Self> {
        Self::new(config, named_trainable_variables(vs)?)
    }

    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Read at every step, as PyTorch reads `param_groups[0]["lr"]`: a schedule sets it before each step.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The parameters that require grad now, in order (what a data-parallel reducer averages).
    pub fn trainable_params(&self) -> Vec<Tensor> {
        self.params.iter().filter(|p| p.tensor.requires_grad()).map(|p| p.tensor.shallow_clone()).collect()
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Zeroes every defined gradient and marks it absent until a backward writes it (see the module note).
    pub fn zero_grad(&mut self) {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let mut grad = p.tensor.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
                p.zeroed = Some((grad.data_ptr() as usize, grad.internal_version()));
            }
        }
    }

    /// The gradients `step` would use, in parameter order (see [`Optimizer::grads`]).
    pub fn grads(&self) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for p in &self.params {
            if let Some(g) = p.live_grad()? {
                out.push(g);
            }
        }
        Ok(out)
    }

    /// `clip_grad_norm` over this optimiser's gradients; the total norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<Tensor> {
        clip_grad_norm(&self.grads()?, max_norm)
    }

    /// Updates every parameter that requires grad and has a fresh gradient; the others keep values and state.
    pub fn step(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let config = self.config;
        let Self { params, scratch, .. } = self;
        for i in 0..params.len() {
            let Some(grad) = params[i].live_grad()? else { continue };
            let (kind, device) = (params[i].tensor.kind(), params[i].tensor.device());
            let fits = scratch.as_ref().is_some_and(|s| s.kind() == kind && s.device() == device);
            if !fits {
                // Sized once for the largest parameter of this kind and device.
                let largest = params
                    .iter()
                    .filter(|q| q.tensor.kind() == kind && q.tensor.device() == device)
                    .map(|q| q.tensor.numel() as i64)
                    .max()
                    .unwrap_or(0);
                *scratch = Some(Tensor::f_empty([2, largest], (kind, device))?);
            }
            let scratch = scratch.as_ref().expect("allocated above");
            let p = &mut params[i];
            let name = &p.name;
            ensure!(
                grad.size() == p.tensor.size(),
                "parameter {name:?} has shape {:?} but its gradient {:?}",
                p.tensor.size(),
                grad.size()
            );
            if p.state.is_none() {
                p.state = Some(ParamState::zeros(&p.tensor, config.amsgrad)?);
            }
            let state = p.state.as_mut().expect("initialised above");
            let (numel, shape) = (p.tensor.numel() as i64, p.tensor.size());
            let tmp = [0, 1].map(|j| scratch.get(j).narrow(0, 0, numel).view(shape.as_slice()));
            adam_update(&config, &mut p.tensor, &grad, state, &tmp)
                .with_context(|| format!("Adam step of {name:?}"))?;
        }
        Ok(())
    }

    /// Writes the state under `prefix`: tensors `{prefix}.exp_avg.{param}`, `{prefix}.exp_avg_sq.{param}`,
    /// `{prefix}.max_exp_avg_sq.{param}` (amsgrad) and `{prefix}.step.{param}` (0-d f32) for every parameter that
    /// has taken a step, and the hyper-parameters as metadata `{prefix}.algorithm`, `.lr`, `.beta1`, `.beta2`,
    /// `.eps`, `.weight_decay`, `.amsgrad` in `sd.metadata` (pass it to `save_safetensors`). The tensors are copies
    /// on the CPU: stepping on does not change them.
    pub fn save_state(&self, sd: &mut StateDict, prefix: &str) -> Result<()> {
        let c = &self.config;
        let meta = [
            ("algorithm", c.algorithm().to_string()),
            ("lr", c.lr.to_string()),
            ("beta1", c.betas.0.to_string()),
            ("beta2", c.betas.1.to_string()),
            ("eps", c.eps.to_string()),
            ("weight_decay", c.weight_decay.to_string()),
            ("amsgrad", c.amsgrad.to_string()),
        ];
        for (k, v) in meta {
            sd.metadata.insert(format!("{prefix}.{k}"), v);
        }
        for p in &self.params {
            let Some(s) = &p.state else { continue };
            sd.insert(format!("{prefix}.exp_avg.{}", p.name), snapshot(&s.exp_avg)?);
            sd.insert(format!("{prefix}.exp_avg_sq.{}", p.name), snapshot(&s.exp_avg_sq)?);
            if let Some(m) = &s.max_exp_avg_sq {
                sd.insert(format!("{prefix}.max_exp_avg_sq.{}", p.name), snapshot(m)?);
            }
            sd.insert(format!("{prefix}.step.{}", p.name), Tensor::from_slice(&[s.step]).reshape([]));
        }
        Ok(())
    }

    /// Restores what [`Adam::save_state`] wrote: the hyper-parameters (as PyTorch's `load_state_dict` restores the
    /// param groups) and every parameter's state, copied to the parameter's device and dtype. Checks everything
    /// before changing anything: an entry for an unknown parameter, a shape that differs, a partial state or a
    /// state of the other algorithm is an error naming the key.
    pub fn load_state(&mut self, sd: &StateDict, prefix: &str) -> Result<()> {
        let algorithm = meta(sd, prefix, "algorithm")?;
        ensure!(
            algorithm == self.config.algorithm(),
            "the checkpoint holds {algorithm} state under {prefix:?} but this optimiser is {}",
            self.config.algorithm()
        );
        let config = AdamConfig {
            lr: meta_parse(sd, prefix, "lr")?,
            betas: (meta_parse(sd, prefix, "beta1")?, meta_parse(sd, prefix, "beta2")?),
            eps: meta_parse(sd, prefix, "eps")?,
            weight_decay: meta_parse(sd, prefix, "weight_decay")?,
            amsgrad: meta_parse(sd, prefix, "amsgrad")?,
            decoupled_weight_decay: self.config.decoupled_weight_decay,
        };
        config.validate().with_context(|| format!("hyper-parameters under {prefix:?}"))?;

        let index: HashMap<&str, usize> = self.params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
        let mut found: Vec<BTreeMap<&str, &Tensor>> = vec![BTreeMap::new(); self.params.len()];
        let head = format!("{prefix}.");
        for (key, t) in sd.iter() {
            let Some(rest) = key.strip_prefix(&head) else { continue };
            let (field, name) = rest.split_once('.').ok_or_else(|| anyhow!("unexpected optimiser entry {key:?}"))?;
            let allowed: &[&str] = if config.amsgrad {
                &["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
            } else {
                &["exp_avg", "exp_avg_sq", "step"]
            };
            ensure!(
                allowed.contains(&field),
                "unexpected optimiser entry {key:?}: {field:?} is not a state of {}{}",
                config.algorithm(),
                if config.amsgrad { " with amsgrad" } else { "" }
            );
            let &i = index.get(name).ok_or_else(|| anyhow!("optimiser entry {key:?}: no parameter named {name:?}"))?;
            found[i].insert(field, t);
        }

        let mut states = Vec::with_capacity(self.params.len());
        for (p, fields) in self.params.iter().zip(&found) {
            if fields.is_empty() {
                states.push(None);
                continue;
            }
            let get = |field: &str| {
                fields.get(field).copied().ok_or_else(|| {
                    anyhow!("optimiser state of {:?} is incomplete: {head}{field}.{} is missing", p.name, p.name)
                })
            };
            let restore = |field: &str| -> Result<Tensor> {
                let t = get(field)?;
                ensure!(
                    t.size() == p.tensor.size(),
                    "{head}{field}.{} has shape {:?} but the parameter has shape {:?}",
                    p.name,
                    t.size(),
                    p.tensor.size()
                );
                let mut fresh = p.tensor.f_zeros_like()?;
                fresh.f_copy_(t)?;
                Ok(fresh)
            };
            let step_t = get("step")?;
            ensure!(
                step_t.numel() == 1,
                "{head}step.{} has shape {:?}; a step count is a scalar",
                p.name,
                step_t.size()
            );
            let step = step_t.f_double_value(&[])?;
            ensure!(
                step >= 0.0 && step.fract() == 0.0 && step == f64::from(step as f32),
                "{head}step.{} is {step}, not a step count",
                p.name
            );
            states.push(Some(ParamState {
                step: step as f32,
                exp_avg: restore("exp_avg")?,
                exp_avg_sq: restore("exp_avg_sq")?,
                max_exp_avg_sq: if config.amsgrad { Some(restore("max_exp_avg_sq")?) } else { None },
            }));
        }
        self.config = config;
        for (p, s) in self.params.iter_mut().zip(states) {
            p.state = s;
        }
        Ok(())
    }
}

impl Optimizer for Adam {
    fn id(&self) -> u64 {
        self.id
    }
    fn grads(&self) -> Result<Vec<Tensor>> {
        Adam::grads(self)
    }
    fn step(&mut self) -> Result<()> {
        Adam::step(self)
    }
    fn zero_grad(&mut self) {
        Adam::zero_grad(self)
    }
}

impl ParamState {
    fn zeros(param: &Tensor, amsgrad: bool) -> Result<Self> {
        Ok(Self {
            step: 0.0,
            exp_avg: param.f_zeros_like()?,
            exp_avg_sq: param.f_zeros_like()?,
            max_exp_avg_sq: if amsgrad { Some(param.f_zeros_like()?) } else { None },
        })
    }
}

/// One step of `_single_tensor_adam` (non-capturable). The scalar arithmetic is in f64 as in Python, and each
/// tensor op is the one PyTorch calls, with its rounding. tch has no `value=` for `addcmul_`/`addcdiv_`: the scalar
/// is applied to the first factor beforehand, which rounds exactly as the kernels (`self + value * t1 * t2`,
/// `self + value * t1 / t2`) do.
/// `tmp`: two tensors shaped as `param`, overwritten (the intermediates go there instead of fresh buffers; the
/// kernels and so the rounding are the same).
fn adam_update(
    cfg: &AdamConfig,
    param: &mut Tensor,
    grad: &Tensor,
    s: &mut ParamState,
    tmp: &[Tensor; 2],
) -> Result<()> {
    let (beta1, beta2) = cfg.betas;
    s.step += 1.0;
    let mut grad = grad.shallow_clone();
    if cfg.weight_decay != 0.0 {
        if cfg.decoupled_weight_decay {
            let _ = param.f_mul_scalar_(1.0 - cfg.lr * cfg.weight_decay)?;
        } else {
            grad = add_scaled(&grad, param, cfg.weight_decay)?;
        }
    }
    let _ = s.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
    let _ = s.exp_avg_sq.f_mul_scalar_(beta2)?;
    let _ = s.exp_avg_sq.f_addcmul_(&grad.f_mul_scalar_out(&tmp[0], 1.0 - beta2)?, &grad)?;

    let step = f64::from(s.step);
    let bias_correction1 = 1.0 - beta1.powf(step);
    let bias_correction2 = 1.0 - beta2.powf(step);
    let step_size = cfg.lr / bias_correction1;
    // Python computes `bias_correction2 ** 0.5`, i.e. libm's pow, which need not round as sqrt does; black_box
    // keeps the compiler from turning the pow into a sqrt.
    let bias_correction2_sqrt = bias_correction2.powf(std::hint::black_box(0.5));

    let second = match &s.max_exp_avg_sq {
        Some(max) => {
            let _ = max.f_maximum_out(max, &s.exp_avg_sq)?;
            max
        }
        None => &s.exp_avg_sq,
    };
    let mut denom = second.f_sqrt_out(&tmp[0])?;
    let _ = denom.f_div_scalar_(bias_correction2_sqrt)?;
    let _ = denom.f_add_scalar_(cfg.eps)?;
    let _ = param.f_addcdiv_(&s.exp_avg.f_mul_scalar_out(&tmp[1], -step_size)?, &denom)?;
    Ok(())
}

/// `a + alpha * b` as torch's `a.add(b, alpha=alpha)`, which tch lacks. Its f32 kernels fuse the multiply-add (one
/// rounding, with `alpha` rounded to f32); f64 holds the f32 product exactly, so the only difference is a double
/// rounding on exact ties of the sum (about 2^-29 of values). f64 tensors get an unfused multiply-add.
fn add_scaled(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    let kind = a.kind();
    if kind == Kind::Double {
        return Ok(a.f_add(&b.f_mul_scalar(alpha)?)?);
    }
    let alpha = f64::from(alpha as f32);
    let sum = a.f_to_kind(Kind::Double)?.f_add(&b.f_to_kind(Kind::Double)?.f_mul_scalar(alpha)?)?;
    Ok(sum.f_to_kind(kind)?)
}

/// `torch.nn.utils.clip_grad_norm_` with norm_type 2, on gradients: the total norm is the norm of the per-tensor
/// norms (grouped by device and dtype as PyTorch groups them, on the first gradient's device), the gradients are
/// multiplied in place by `min(max_norm / (total + 1e-6), 1)`, and the total norm before clipping is returned (a 0-d
/// tensor, without a device sync). No gradients: a zero norm and nothing clipped.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let Some(first) = grads.first() else { return Ok(Tensor::from_slice(&[0f32]).reshape([])) };
    let first_device = first.device();
    let mut groups: Vec<((Device, Kind), Vec<&Tensor>)> = Vec::new();
    for g in grads {
        let key = (g.device(), g.kind());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(g),
            None => groups.push((key, vec![g])),
        }
    }
    let mut norms = Vec::with_capacity(grads.len());
    for (_, group) in &groups {
        for g in group {
            // `norm` with p = 2 is `linalg_vector_norm` underneath, which tch does not bind.
            norms.push(g.f_norm()?.f_to_device(first_device)?);
        }
    }
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
    // Python's `max_norm / t` is `t.reciprocal() * max_norm`.
    let coef = total.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?.f_clamp_max(1.0)?;
    for ((device, _), group) in &groups {
        let coef = coef.f_to_device(*device)?;
        for g in group {
            let mut g = g.shallow_clone();
            let _ = g.f_mul_(&coef)?;
        }
    }
    Ok(total)
}

/// The defined gradients of some parameters, for [`clip_grad_norm`] without an optimiser.
pub fn defined_grads(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(Tensor::grad).filter(Tensor::defined).collect()
}

/// A CPU copy that later in-place updates of `t` do not reach.
pub(crate) fn snapshot(t: &Tensor) -> Result<Tensor> {
    let t = t.f_detach()?;
    Ok(if t.device() == Device::Cpu { t.f_detach_copy()? } else { t.f_to_device(Device::Cpu)? })
}

pub(crate) fn meta<'a>(sd: &'a StateDict, prefix: &str, key: &str) -> Result<&'a str> {
    sd.metadata
        .get(&format!("{prefix}.{key}"))
        .map(String::as_str)
        .ok_or_else(|| anyhow!("metadata {prefix}.{key} is missing: no state saved under {prefix:?}?"))
}

pub(crate) fn meta_parse<T: std::str::FromStr>(sd: &StateDict, prefix: &str, key: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let v = meta(sd, prefix, key)?;
    v.parse().map_err(|e| anyhow!("metadata {prefix}.{key} = {v:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_like_pytorch() {
        assert!(AdamConfig::adam(1e-3).validate().is_ok());
        assert!(AdamConfig::adam(-1.0).validate().is_err());
        assert!(AdamConfig::adam(1e-3).betas(1.0, 0.9).validate().is_err());
        assert!(AdamConfig::adamw(1e-3).weight_decay(-0.1).validate().is_err());
        assert_eq!(AdamConfig::adamw(1e-3).weight_decay, 1e-2);
        let err = Adam::new(AdamConfig::adam(1e-3), vec![]).err().unwrap();
        assert!(err.to_string().contains("empty parameter list"), "{err}");
    }

    #[test]
    fn clip_without_grads_is_zero() {
        let n = clip_grad_norm(&[], 1.0).unwrap();
        assert_eq!(n.size(), Vec::<i64>::new());
        assert_eq!(n.double_value(&[]), 0.0);
    }

    #[test]
    fn saved_state_is_a_copy() {
        let p = Tensor::from_slice(&[1f32, 2.0]).set_requires_grad(true);
        let mut opt = Adam::new(AdamConfig::adam(0.1), vec![("w".into(), p.shallow_clone())]).unwrap();
        (&p * &p).sum(Kind::Float).backward();
        opt.step().unwrap();
        let mut sd = StateDict::new();
        opt.save_state(&mut sd, "opt").unwrap();
        let before = sd.get("opt.exp_avg.w").unwrap().copy();
        opt.step().unwrap();
        assert!(sd.get("opt.exp_avg.w").unwrap().equal(&before));
    }
}
