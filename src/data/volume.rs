//! NIfTI volumes through the `nifti` crate: read any on-disk dtype as float64 with
//! `scl_slope`/`scl_inter` applied (what nibabel's `get_fdata` returns), write float32 volumes
//! atomically.
use anyhow::{anyhow, ensure, Context, Result};
use ndarray::{Array3, Ix3};
use nifti::writer::WriterOptions;
use nifti::{IntoNdArray, NiftiHeader, NiftiObject, NiftiVolume, ReaderOptions};
use std::path::{Path, PathBuf};

/// A 3-D volume indexed `[i, j, k]` as nibabel indexes `get_fdata()`.
#[derive(Debug, Clone)]
pub struct Volume {
    pub data: Array3<f64>,
    pub header: NiftiHeader,
}

impl Volume {
    pub fn dims(&self) -> [usize; 3] {
        let s = self.data.shape();
        [s[0], s[1], s[2]]
    }
}

/// Reads a `.nii` or `.nii.gz`. A 4-D volume with one time point is accepted as 3-D.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let obj = ReaderOptions::new()
        .read_file(path)
        .map_err(|e| anyhow!("{}: cannot read NIfTI: {e}", path.display()))?;
    let header = obj.header().clone();
    let mut volume = obj.into_volume();
    if !header.scl_slope.is_finite() {
        // nibabel treats a NaN or infinite slope as "no scaling"; the nifti crate would apply it.
        let (dim, datatype, endianness) = (header.dim, volume.data_type(), header.endianness);
        volume = nifti::InMemNiftiVolume::from_raw_fields(dim, datatype, 0.0, 0.0, volume.into_raw_data(), endianness)
            .map_err(|e| anyhow!("{}: cannot rebuild the volume without its slope: {e}", path.display()))?;
    }
    let data = volume
        .into_ndarray::<f64>()
        .map_err(|e| anyhow!("{}: cannot decode the NIfTI volume: {e}", path.display()))?;
    let shape = data.shape().to_vec();
    let data = match shape.len() {
        3 => data,
        4 if shape[3] == 1 => data.index_axis_move(ndarray::Axis(3), 0),
        _ => return Err(anyhow!("{}: expected a 3-D volume, got shape {shape:?}", path.display())),
    };
    let data = data
        .into_dimensionality::<Ix3>()
        .with_context(|| format!("{}: expected a 3-D volume", path.display()))?;
    Ok(Volume { data, header })
}

/// The temporary name a file is written under before it is renamed into place: same
/// directory (so the rename is atomic), same extension (the NIfTI writer compresses by it).
pub fn temporary_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: not a file name", path.display()))?;
    Ok(path.with_file_name(format!(".tmp-{}-{name}", std::process::id())))
}

/// Writes `data` as float32 NIfTI (gzip if the name ends in `.gz`), copying the geometry of
/// `reference` when given. Written to a temporary file and renamed: a reader never sees half a file.
pub fn write_volume(path: &Path, data: &Array3<f32>, reference: Option<&NiftiHeader>) -> Result<()> {
    ensure!(data.iter().all(|v| v.is_finite()), "{}: refusing to write non-finite values", path.display());
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = temporary_path(path)?;
    let opts = WriterOptions::new(&tmp);
    let opts = match reference {
        Some(h) => opts.reference_header(h),
        None => opts,
    };
    opts.write_nifti(data).map_err(|e| anyhow!("{}: cannot write NIfTI: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}
