//! The reference's evaluation metrics (reference-repo.md §5), each with parity tests against
//! MONAI / the reference formulas.
