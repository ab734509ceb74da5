//! Networks, one file per model, with field and VarStore names equal to MONAI's.
pub mod autoencoder_kl;
pub mod blocks;
pub mod controlnet;
pub mod diffusion_model_unet;
pub mod lpips;
pub mod patch_discriminator;
pub mod radimagenet_resnet50;
mod unet_blocks;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
pub use blocks::PerLevel;
pub use controlnet::{ControlNet, ControlNetConfig, ControlNetOutput};
pub use diffusion_model_unet::{Conditioning, DiffusionModelUNet, DiffusionModelUNetConfig};
