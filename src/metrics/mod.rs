//! The reference's evaluation metrics (reference-repo.md §5), each with parity tests against
//! MONAI / the reference formulas.
pub mod fid;
pub mod inception;
pub mod regression;
pub mod ssim;
