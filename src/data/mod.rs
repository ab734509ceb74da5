//! Data: the reference slice extraction and lists, the synthetic default data
//! set, the training data loader and its volumes.
pub mod augment;
pub mod loader;
pub mod preprocess;
pub mod synth;
pub mod volumes;
