//! Data: the reference slice extraction and lists, the synthetic default data
//! set, and the training data loader.
pub mod augment;
pub mod loader;
pub mod preprocess;
pub mod synth;
