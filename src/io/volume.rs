//! NIfTI volumes through the `nifti` crate: read any on-disk dtype as float64 with
//! `scl_slope`/`scl_inter` applied (what nibabel's `get_fdata` returns), whole or a run of slices,
//! and write float32 volumes atomically.
use anyhow::{anyhow, bail, ensure, Context, Result};
use flate2::read::GzDecoder;
use ndarray::{Array3, Ix3};
use nifti::writer::WriterOptions;
use nifti::{IntoNdArray, NiftiHeader, NiftiObject, NiftiVolume, ReaderOptions};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Whether a file name is a NIfTI volume's (`.nii`, `.nii.gz`, any case).
pub fn is_volume_name(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        let n = n.to_ascii_lowercase();
        n.ends_with(".nii") || n.ends_with(".nii.gz")
    })
}

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
    let obj =
        ReaderOptions::new().read_file(path).map_err(|e| anyhow!("{}: cannot read NIfTI: {e}", path.display()))?;
    let header = obj.header().clone();
    let mut volume = obj.into_volume();
    if !header.scl_slope.is_finite() {
        // nibabel treats a NaN or infinite slope as "no scaling"; the nifti crate would apply it.
        let (dim, datatype, endianness) = (header.dim, volume.data_type(), header.endianness);
        volume = nifti::InMemNiftiVolume::from_raw_fields(dim, datatype, 0.0, 0.0, volume.into_raw_data(), endianness)
            .map_err(|e| anyhow!("{}: cannot rebuild the volume without its slope: {e}", path.display()))?;
    }
    let data =
        volume.into_ndarray::<f64>().map_err(|e| anyhow!("{}: cannot decode the NIfTI volume: {e}", path.display()))?;
    let shape = data.shape().to_vec();
    let data = match shape.len() {
        3 => data,
        4 if shape[3] == 1 => data.index_axis_move(ndarray::Axis(3), 0),
        _ => return Err(anyhow!("{}: expected a 3-D volume, got shape {shape:?}", path.display())),
    };
    let data =
        data.into_dimensionality::<Ix3>().with_context(|| format!("{}: expected a 3-D volume", path.display()))?;
    Ok(Volume { data, header })
}

/// A `.nii` / `.nii.gz` opened for reading a run of slices along the last axis without holding the
/// whole volume: the header is parsed on open, the voxels are streamed past. Preprocessing needs 5
/// of ~190 slices; decoding and converting all of them to float64 was most of its time.
pub struct SliceReader {
    path: PathBuf,
    reader: Box<dyn Read>,
    pub header: NiftiHeader,
    dims: [usize; 3],
    datatype: nifti::NiftiType,
}

impl SliceReader {
    /// Reads the header (NIfTI-1, either byte order) and moves to the first voxel. A 4-D volume with one time
    /// point is accepted as 3-D, as [`read_volume`] does.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let gz = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".gz"));
        let mut reader: Box<dyn Read> = if gz {
            Box::new(GzDecoder::new(BufReader::with_capacity(1 << 16, file)))
        } else {
            Box::new(BufReader::with_capacity(1 << 16, file))
        };
        let header =
            NiftiHeader::from_reader(&mut reader).map_err(|e| anyhow!("{}: cannot read NIfTI: {e}", path.display()))?;
        let dim = header.dim().map_err(|e| anyhow!("{}: cannot read NIfTI: {e}", path.display()))?;
        let dims = match dim {
            [x, y, z] | [x, y, z, 1] => [*x as usize, *y as usize, *z as usize],
            _ => bail!("{}: expected a 3-D volume, got shape {dim:?}", path.display()),
        };
        let datatype = header.data_type().map_err(|e| anyhow!("{}: cannot read NIfTI: {e}", path.display()))?;
        // The 348-byte header is read; extensions (if any) run up to vox_offset, never before byte 352.
        let skip = (header.vox_offset as u64).max(352) - 348;
        let skipped = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())
            .with_context(|| format!("{}: cannot read NIfTI", path.display()))?;
        ensure!(skipped == skip, "{}: the file ends before its voxels", path.display());
        Ok(Self { path: path.to_path_buf(), reader, header, dims, datatype })
    }

    /// `[i, j, k]` extent, as [`Volume::dims`].
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// Slices `start..end` of the last axis as float64 (`get_fdata()[:, :, start:end]`). The rest of the file is
    /// read through too, so a truncated or corrupt file (gzip CRC) is an error, as with [`read_volume`].
    pub fn read_slices(mut self, start: usize, end: usize) -> Result<Array3<f64>> {
        let [nx, ny, nz] = self.dims;
        let path = self.path.display().to_string();
        ensure!(start <= end && end <= nz, "{path}: slices {start}..{end} outside a volume of {nz}");
        let slice_bytes = nx * ny * self.datatype.size_of();
        let skipped = std::io::copy(&mut (&mut self.reader).take((start * slice_bytes) as u64), &mut std::io::sink())
            .with_context(|| format!("{path}: cannot read the voxels"))?;
        let mut raw = vec![0u8; (end - start) * slice_bytes];
        if skipped as usize != start * slice_bytes || self.reader.read_exact(&mut raw).is_err() {
            bail!("{path}: cannot read the voxels: the file ends early (a truncated or corrupt file)");
        }
        let rest = ((nz - end) * slice_bytes) as u64;
        let left = std::io::copy(&mut self.reader, &mut std::io::sink())
            .with_context(|| format!("{path}: cannot read the voxels (a truncated or corrupt file)"))?;
        ensure!(left >= rest, "{path}: the file ends early ({left} of {rest} trailing voxel bytes)");
        let h = &self.header;
        // nibabel treats a NaN or infinite slope as "no scaling"; the nifti crate would apply it.
        let (slope, inter) = if h.scl_slope.is_finite() { (h.scl_slope, h.scl_inter) } else { (0.0, 0.0) };
        let raw_dim = [3, nx as u16, ny as u16, (end - start) as u16, 1, 1, 1, 1];
        let volume = nifti::InMemNiftiVolume::from_raw_fields(raw_dim, self.datatype, slope, inter, raw, h.endianness)
            .map_err(|e| anyhow!("{path}: cannot decode the NIfTI volume: {e}"))?;
        let data = volume.into_ndarray::<f64>().map_err(|e| anyhow!("{path}: cannot decode the NIfTI volume: {e}"))?;
        data.into_dimensionality::<Ix3>().with_context(|| format!("{path}: expected a 3-D volume"))
    }
}

/// Writes `data` as float32 NIfTI (gzip if the name ends in `.gz`), copying the geometry of
/// `reference` when given. Written to a temporary file and renamed: a reader never sees half a file.
pub fn write_volume(path: &Path, data: &Array3<f32>, reference: Option<&NiftiHeader>) -> Result<()> {
    ensure!(data.iter().all(|v| v.is_finite()), "{}: refusing to write non-finite values", path.display());
    super::atomic::write_with(path, |tmp| {
        let opts = WriterOptions::new(tmp);
        let opts = match reference {
            Some(h) => opts.reference_header(h),
            None => opts,
        };
        opts.write_nifti(data).map_err(|e| anyhow!("{}: cannot write NIfTI: {e}", tmp.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> Array3<f32> {
        Array3::from_shape_fn((7, 5, 9), |(i, j, k)| (i * 100 + j * 10 + k) as f32 * 0.5 - 3.0)
    }

    #[test]
    fn slices_equal_the_whole_volume_read() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["v.nii", "v.nii.gz"] {
            let path = dir.path().join(name);
            write_volume(&path, &ramp(), None).unwrap();
            let whole = read_volume(&path).unwrap().data;
            let reader = SliceReader::open(&path).unwrap();
            assert_eq!(reader.dims(), [7, 5, 9]);
            let slab = reader.read_slices(3, 8).unwrap();
            assert_eq!(slab, whole.slice(ndarray::s![.., .., 3..8]), "{name}");
            assert!(SliceReader::open(&path).unwrap().read_slices(8, 10).is_err());
        }
    }

    #[test]
    fn truncated_or_corrupt_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.nii.gz");
        write_volume(&path, &ramp(), None).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // Cut after the slices read: only reading through the rest notices.
        let cut = dir.path().join("cut.nii.gz");
        std::fs::write(&cut, &bytes[..bytes.len() - 12]).unwrap();
        let e = SliceReader::open(&cut).and_then(|r| r.read_slices(0, 2)).unwrap_err();
        assert!(format!("{e:#}").contains("cut.nii.gz"), "{e:#}");
        // A flipped byte in the gzip trailer's CRC.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 6] ^= 0xff;
        let crc = dir.path().join("crc.nii.gz");
        std::fs::write(&crc, &bad).unwrap();
        let e = SliceReader::open(&crc).and_then(|r| r.read_slices(0, 2)).unwrap_err();
        assert!(format!("{e:#}").contains("crc.nii.gz"), "{e:#}");
        // Uncompressed and short of its last slice.
        let raw = dir.path().join("v.nii");
        write_volume(&raw, &ramp(), None).unwrap();
        let b = std::fs::read(&raw).unwrap();
        let short = dir.path().join("short.nii");
        std::fs::write(&short, &b[..b.len() - 4]).unwrap();
        let e = SliceReader::open(&short).and_then(|r| r.read_slices(0, 2)).unwrap_err();
        assert!(format!("{e:#}").contains("short.nii") && format!("{e:#}").contains("ends early"), "{e:#}");
    }
}
