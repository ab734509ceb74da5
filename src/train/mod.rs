//! Training: optimisers with state, the loss scaler, checkpoints and the three stage loops.
pub mod aekl;
pub mod checkpoint;
pub mod diffusion;
pub mod grad_scaler;
pub mod init;
pub mod optim;
pub mod run;
pub mod stages;
