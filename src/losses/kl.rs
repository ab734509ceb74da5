//! The AutoencoderKL's KL term as the reference training loop (and every MONAI tutorial) writes it; MONAI itself
//! has no such loss:
//!
//! ```python
//! kl_loss = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=[1, 2, 3])
//! kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
//! ```
//!
//! KL(N(mu, sigma^2) || N(0, 1)) summed over the latent's elements, averaged over the batch.
use tch::Tensor;

/// The KL term of a batch of latents `(batch, channels, spatial...)`, a 0-d tensor. For 2D latents these are the
/// reference's operations in its order (bit-exact, gradients included); other ranks sum over every non-batch
/// dimension, as the 3D tutorials do (`dim=[1, 2, 3, 4]`).
///
/// Panics when the shapes differ (PyTorch would broadcast them silently) or the latent has no batch dimension.
pub fn kl_loss(z_mu: &Tensor, z_sigma: &Tensor) -> Tensor {
    assert_eq!(z_mu.size(), z_sigma.size(), "kl_loss: z_mu and z_sigma shapes differ");
    assert!(z_mu.dim() >= 2, "kl_loss: expected (batch, channels, ...), got shape {:?}", z_mu.size());
    let batch = z_mu.size()[0];
    let dims: Vec<i64> = (1..z_mu.dim() as i64).collect();
    // sigma.pow(2) twice, as written: one shared node would sum the two gradient paths before the pow backward,
    // rounding differently from PyTorch.
    let sq = |t: &Tensor| t.pow_tensor_scalar(2i64);
    let per_sample = (sq(z_mu) + sq(z_sigma) - sq(z_sigma).log() - 1i64).sum_dim_intlist(dims, false, None) * 0.5;
    per_sample.sum(None) / batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn standard_normal_has_zero_kl_and_shift_adds_half_mu_squared() {
        let opts = (Kind::Float, Device::Cpu);
        let sigma = Tensor::ones([2, 3, 4, 5], opts);
        assert_eq!(f64::try_from(kl_loss(&Tensor::zeros([2, 3, 4, 5], opts), &sigma)).unwrap(), 0.0);
        // 60 elements per sample, each 0.5 * 2^2.
        let kl = f64::try_from(kl_loss(&Tensor::full([2, 3, 4, 5], 2.0, opts), &sigma)).unwrap();
        assert_eq!(kl, 120.0);
    }
}
