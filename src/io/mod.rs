//! Files shared by preprocessing, training, sampling and evaluation: PNGs and image grids, NIfTI volumes, and the
//! write-then-rename every output goes through.
pub mod atomic;
pub mod png;
pub mod volume;
