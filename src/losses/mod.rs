//! Training losses: adversarial, KL, perceptual (LPIPS).
pub mod adversarial;
pub mod kl;
pub mod perceptual;
