//! Training losses: adversarial, KL, perceptual (LPIPS).
pub mod perceptual;
