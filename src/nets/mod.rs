//! Networks, one file per model, with field and VarStore names equal to MONAI's.
pub mod autoencoder_kl;
pub mod blocks;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
pub mod diffusion_model_unet;
mod unet_blocks;

pub use diffusion_model_unet::{Conditioning, DiffusionModelUNet, DiffusionModelUNetConfig};
pub mod controlnet;

pub use controlnet::{ControlNet, ControlNetConfig, ControlNetOutput};
