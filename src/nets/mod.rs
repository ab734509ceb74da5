//! Networks, one file per model, with field and VarStore names equal to MONAI's.
pub mod autoencoder_kl;
pub mod blocks;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
