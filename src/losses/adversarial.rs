//! `PatchAdversarialLoss`, after MONAI 1.6.1 `monai/losses/adversarial_loss.py` (monai-generative 0.2.3 has the
//! same code). The discriminator's raw logits go in; the criterion applies its own activation.
//!
//! MONAI's behaviour, kept as is:
//! - least squares: LeakyReLU(0.05) on the logits (none with `no_activation_leastsq`), then `MSELoss` against
//!   1 (real) or 0 (fake);
//! - bce: sigmoid, then `BCELoss` (not the logits form: saturated logits give PyTorch's clamped log, -100);
//! - hinge: tanh, then `-mean(min(x - 1, 0))`, with `x` negated for fake targets. It always takes the mean: the
//!   reduction only combines several discriminators;
//! - `for_discriminator = false` forces `target_is_real = true` (MONAI warns; medgen does silently), so the
//!   generator's hinge loss is the discriminator's real-target loss `mean(max(1 - tanh(x), 0))`;
//! - a list of outputs (multi-scale discriminators) gives one loss each, then `mean(stack)` or `sum(stack)`.
//!   Passing a whole `PatchDiscriminator` output list would average the loss over its intermediate feature maps
//!   too: the reference passes only the logits (`[-1]`).
use crate::nets::patch_discriminator::leaky_relu;
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use tch::{Reduction, Tensor};

/// MONAI's `AdversarialCriterions` values (MONAI validates the name case-insensitively but then compares it
/// exactly, so only these spellings work there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdversarialCriterion {
    Bce,
    Hinge,
    #[default]
    LeastSquares,
}

/// MONAI's `LossReduction` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossReduction {
    #[default]
    Mean,
    Sum,
    None,
}

impl LossReduction {
    fn torch(self) -> Reduction {
        match self {
            LossReduction::Mean => Reduction::Mean,
            LossReduction::Sum => Reduction::Sum,
            LossReduction::None => Reduction::None,
        }
    }
}

/// Constructor arguments of `PatchAdversarialLoss`, with MONAI's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PatchAdversarialLoss {
    pub reduction: LossReduction,
    pub criterion: AdversarialCriterion,
    pub no_activation_leastsq: bool,
}

impl PatchAdversarialLoss {
    pub fn new(reduction: LossReduction, criterion: AdversarialCriterion, no_activation_leastsq: bool) -> Self {
        Self { reduction, criterion, no_activation_leastsq }
    }

    /// The reference training's loss: least squares on the raw logits, mean.
    pub fn reference() -> Self {
        Self::new(LossReduction::Mean, AdversarialCriterion::LeastSquares, true)
    }

    fn activate(&self, x: &Tensor) -> Tensor {
        match self.criterion {
            AdversarialCriterion::Bce => x.sigmoid(),
            AdversarialCriterion::Hinge => x.tanh(),
            AdversarialCriterion::LeastSquares if self.no_activation_leastsq => x.shallow_clone(),
            AdversarialCriterion::LeastSquares => leaky_relu(x, 0.05),
        }
    }

    /// One loss per discriminator output: what MONAI returns with `reduction="none"` (an element-wise map for
    /// least squares and bce, a scalar for hinge), and what the other reductions combine.
    pub fn losses<T: Borrow<Tensor>>(
        &self,
        inputs: &[T],
        target_is_real: bool,
        for_discriminator: bool,
    ) -> Vec<Tensor> {
        let real = target_is_real || !for_discriminator;
        inputs
            .iter()
            .map(|x| {
                let x = self.activate(x.borrow());
                // MONAI's targets: a 0-d tensor of the input's dtype, expanded (never materialised). Filled on the
                // input's device, where MONAI copies a host tensor over at every step.
                let (kind, device, shape) = (x.kind(), x.device(), x.size());
                let label = |v: f64| Tensor::full([], v, (kind, device)).expand(&shape, false);
                match self.criterion {
                    AdversarialCriterion::Hinge => {
                        let x = if real { x } else { -x };
                        // torch.min of two tensors is `minimum` (ties split the gradient; they only happen where
                        // tanh saturates and its own gradient is 0).
                        -(x - 1i64).minimum(&label(0.0)).mean(None)
                    }
                    AdversarialCriterion::Bce => {
                        let target = label(if real { 1.0 } else { 0.0 });
                        x.binary_cross_entropy(&target, None::<Tensor>, self.reduction.torch())
                    }
                    AdversarialCriterion::LeastSquares => {
                        x.mse_loss(&label(if real { 1.0 } else { 0.0 }), self.reduction.torch())
                    }
                }
            })
            .collect()
    }

    /// The loss of several discriminator outputs, `mean` or `sum` of their losses. `reduction = "none"` has no
    /// single tensor for several outputs: use [`Self::losses`].
    pub fn forward_list<T: Borrow<Tensor>>(
        &self,
        inputs: &[T],
        target_is_real: bool,
        for_discriminator: bool,
    ) -> Result<Tensor> {
        ensure!(!inputs.is_empty(), "PatchAdversarialLoss: no discriminator outputs");
        let mut losses = self.losses(inputs, target_is_real, for_discriminator);
        Ok(match self.reduction {
            LossReduction::Mean => Tensor::stack(&losses, 0).mean(None),
            LossReduction::Sum => Tensor::stack(&losses, 0).sum(None),
            LossReduction::None if losses.len() == 1 => losses.pop().unwrap(),
            LossReduction::None => {
                bail!(
                    "PatchAdversarialLoss: reduction none gives {} losses, one per output: use losses()",
                    losses.len()
                )
            }
        })
    }

    /// The loss of one discriminator output (MONAI wraps it in a list: the reduced value is the same).
    pub fn forward(&self, input: &Tensor, target_is_real: bool, for_discriminator: bool) -> Tensor {
        self.forward_list(std::slice::from_ref(input), target_is_real, for_discriminator).expect("one output")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn config_names_are_monai_s() {
        let l: PatchAdversarialLoss =
            serde_json::from_str(r#"{"criterion": "least_squares", "no_activation_leastsq": true}"#).unwrap();
        assert_eq!(l, PatchAdversarialLoss::reference());
        let l: PatchAdversarialLoss = serde_json::from_str(r#"{"criterion": "hinge", "reduction": "none"}"#).unwrap();
        assert_eq!((l.criterion, l.reduction), (AdversarialCriterion::Hinge, LossReduction::None));
        assert!(serde_json::from_str::<PatchAdversarialLoss>(r#"{"criterion": "LEAST_SQUARES"}"#).is_err());
    }

    #[test]
    fn generator_target_is_always_real_and_none_needs_one_output() {
        let x = Tensor::randn([2, 1, 3, 3], (Kind::Float, Device::Cpu));
        for criterion in [AdversarialCriterion::Bce, AdversarialCriterion::Hinge, AdversarialCriterion::LeastSquares] {
            let l = PatchAdversarialLoss::new(LossReduction::Mean, criterion, false);
            assert!(l.forward(&x, false, false).equal(&l.forward(&x, true, false)), "{criterion:?}");
            assert!(!l.forward(&x, false, true).equal(&l.forward(&x, true, true)), "{criterion:?}");
        }
        let l = PatchAdversarialLoss::new(LossReduction::None, AdversarialCriterion::Bce, false);
        assert_eq!(l.forward(&x, true, true).size(), x.size());
        assert!(l.forward_list(&[&x, &x], true, true).is_err());
        assert!(l.forward_list::<Tensor>(&[], true, true).is_err());
    }
}
