//! medgen: MONAI Generative Models (AutoencoderKL, latent diffusion, ControlNet) on libtorch,
//! with numerical parity against the PyTorch originals.
pub mod amp;
pub mod bundle;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod evaluate;
pub mod generate;
pub mod io;
pub mod losses;
pub mod memory_format;
pub mod metrics;
pub mod nets;
pub mod panics;
pub mod sampling;
pub mod schedulers;
pub mod sliding_window;
pub mod text;
pub mod train;
