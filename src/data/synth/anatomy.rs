//! The real anatomy every subject is drawn from: the ICBM 2009a symmetric template (T1, GM, WM at
//! 1 mm) read straight out of the nilearn wheel, and what is derived from it once per run.
//!
//! Derived maps:
//! * Brain mask: the template T1 is skull-stripped, so its non-zero support is the ICBM brain mask
//!   (it holds every voxel with GM + WM ≥ 0.5 and has no holes). It is united with GM + WM ≥ 0.5
//!   anyway, closed with a ball (`HeadParams::closing_mm`) so that the skull laid on it does not
//!   dip into the interhemispheric fissure or between the temporal lobes and the cerebellum, and
//!   hole-filled.
//! * CSF = mask − GM − WM. Inside the mask the template T1 is dark wherever GM + WM is low (5–95 %
//!   range 36–80 against 166 in grey matter), so the remainder is fluid and no intensity model is
//!   needed; the band the closing adds (fissures, cisterns) is fluid too.
//! * Distance to the closed mask, on which the skull and scalp layers are laid per subject.
//! * Lesion sites: white-matter voxels where lesion centres may be drawn.
use super::edt::{close, fill_holes, squared_distance, Grid3};
use super::params::{HeadParams, LesionParams};
use anyhow::{anyhow, bail, ensure, Context, Result};
use flate2::read::MultiGzDecoder;
use ndarray::Ix3;
use nifti::volume::InMemNiftiVolume;
use nifti::{IntoNdArray, NiftiHeader};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;
use std::path::Path;

const MEMBER_DIR: &str = "nilearn/datasets/data/";
pub const T1_MEMBER: &str = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz";
pub const GM_MEMBER: &str = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz";
pub const WM_MEMBER: &str = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz";

/// Distances are stored in quarter millimetres in a byte: up to 63.75 mm.
const DISTANCE_STEPS_PER_MM: f32 = 4.0;
/// Margin kept around the closed mask for the skull and scalp layers, beyond the thickest head
/// `subject.rs` can draw (it clamps its layers to `SHELL_LIMIT_MM`).
pub const SHELL_LIMIT_MM: f32 = 32.0;

/// Where the anatomy came from: recorded in `synth.json` and compared on `--resume`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AnatomySource {
    pub wheel: String,
    pub members: Vec<MemberId>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MemberId {
    pub name: String,
    pub crc32: String,
}

impl AnatomySource {
    /// The wheel's name and its members' CRC-32s, from the zip directory alone (cheap: a resumed
    /// run is checked against `synth.json` before the anatomy is built).
    pub fn of_wheel(wheel: &Path) -> Result<AnatomySource> {
        let mut zip = open_wheel(wheel)?;
        let members = [T1_MEMBER, GM_MEMBER, WM_MEMBER]
            .iter()
            .map(|name| {
                let full = format!("{MEMBER_DIR}{name}");
                let entry = zip.by_name(&full).map_err(|e| anyhow!("{}: no member {full}: {e}", wheel.display()))?;
                Ok(MemberId { name: full, crc32: format!("{:08x}", entry.crc32()) })
            })
            .collect::<Result<_>>()?;
        let wheel_name = wheel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(AnatomySource { wheel: wheel_name, members })
    }
}

fn open_wheel(wheel: &Path) -> Result<zip::ZipArchive<File>> {
    let file = File::open(wheel)
        .with_context(|| format!("cannot open the nilearn wheel {} (`make setup` downloads it)", wheel.display()))?;
    zip::ZipArchive::new(file).map_err(|e| anyhow!("{}: not a readable wheel (zip): {e}", wheel.display()))
}

/// Per-voxel `[gm, wm, csf, distance]`: fractions ×255 (they sum to 255 inside the mask) and the
/// distance to the closed brain mask ×4 mm, on the template grid padded for the head layers.
pub struct Anatomy {
    dims: [usize; 3],
    maps: Vec<[u8; 4]>,
    /// Template mm → padded voxel coordinates: rows of a 3×4 matrix.
    mm_to_vox: [[f32; 4]; 3],
    lesion_sites: Vec<[f32; 3]>,
    pub source: AnatomySource,
}

/// Trilinearly interpolated tissue fractions at a point, and its distance outside the brain mask.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    pub gm: f32,
    pub wm: f32,
    pub csf: f32,
    pub distance_mm: f32,
}

struct Template {
    dims: [usize; 3],
    /// C order, `(a * ny + b) * nz + c`, raw values (probabilities ×255 for GM and WM).
    data: Vec<f32>,
    vox_to_mm: [[f64; 4]; 3],
}

impl Anatomy {
    /// Reads the three template volumes from the wheel and derives the maps (a few seconds).
    pub fn from_wheel(wheel: &Path, head: &HeadParams, lesions: &LesionParams) -> Result<Anatomy> {
        let source = AnatomySource::of_wheel(wheel)?;
        let mut zip = open_wheel(wheel)?;
        let t1 = read_member(&mut zip, wheel, T1_MEMBER)?;
        let gm = read_member(&mut zip, wheel, GM_MEMBER)?;
        let wm = read_member(&mut zip, wheel, WM_MEMBER)?;
        for (name, t) in [(GM_MEMBER, &gm), (WM_MEMBER, &wm)] {
            ensure!(
                t.dims == t1.dims && t.vox_to_mm == t1.vox_to_mm,
                "{}: {name} has grid {:?} / affine {:?}, but {T1_MEMBER} has {:?} / {:?}",
                wheel.display(),
                t.dims,
                t.vox_to_mm,
                t1.dims,
                t1.vox_to_mm
            );
        }
        Self::derive(&t1, &gm, &wm, head, lesions, source)
            .with_context(|| format!("{}: deriving the anatomy from the ICBM 2009a template", wheel.display()))
    }

    fn derive(
        t1: &Template,
        gm: &Template,
        wm: &Template,
        head: &HeadParams,
        lesions: &LesionParams,
        source: AnatomySource,
    ) -> Result<Anatomy> {
        let n = t1.dims;
        let raw_mask: Vec<bool> =
            (0..t1.data.len()).map(|i| t1.data[i] > 0.0 || gm.data[i] + wm.data[i] >= 127.5).collect();
        ensure!(raw_mask.iter().any(|&m| m), "the T1 template is empty");

        // Pad wherever the mask comes closer to the border than the closing and the head layers need.
        let need = (head.closing_mm as f32 + SHELL_LIMIT_MM).ceil() as usize + 2;
        let (lo, hi) = bounding_box(&raw_mask, n);
        let pad_lo: [usize; 3] = std::array::from_fn(|ax| need.saturating_sub(lo[ax]));
        let pad_hi: [usize; 3] = std::array::from_fn(|ax| need.saturating_sub(n[ax] - 1 - hi[ax]));
        let dims: [usize; 3] = std::array::from_fn(|ax| n[ax] + pad_lo[ax] + pad_hi[ax]);
        let padded =
            |a: usize, b: usize, c: usize| ((a + pad_lo[0]) * dims[1] + b + pad_lo[1]) * dims[2] + c + pad_lo[2];

        let mut mask = Grid3 { dims, data: vec![false; dims.iter().product()] };
        for a in 0..n[0] {
            for b in 0..n[1] {
                for c in 0..n[2] {
                    mask.data[padded(a, b, c)] = raw_mask[(a * n[1] + b) * n[2] + c];
                }
            }
        }
        let mut mask = close(&mask, head.closing_mm as f32);
        fill_holes(&mut mask);
        let distance = squared_distance(&mask);

        let mut maps: Vec<[u8; 4]> = distance
            .iter()
            .map(|&d2| [0, 0, 0, (d2.sqrt() * DISTANCE_STEPS_PER_MM).round().min(255.0) as u8])
            .collect();
        let mut lesion_sites = Vec::new();
        for a in 0..n[0] {
            for b in 0..n[1] {
                for c in 0..n[2] {
                    let src = (a * n[1] + b) * n[2] + c;
                    let dst = padded(a, b, c);
                    let g = gm.data[src].clamp(0.0, 255.0);
                    let w = wm.data[src].clamp(0.0, 255.0);
                    let csf = if mask.data[dst] { (255.0 - g - w).max(0.0) } else { 0.0 };
                    maps[dst][0] = g.round() as u8;
                    maps[dst][1] = w.round() as u8;
                    maps[dst][2] = csf.round() as u8;
                    let mm = apply(&t1.vox_to_mm, [a as f64, b as f64, c as f64]);
                    if w >= (lesions.site_min_wm * 255.0) as f32
                        && (lesions.site_z_mm[0]..=lesions.site_z_mm[1]).contains(&mm[2])
                    {
                        lesion_sites.push(mm.map(|v| v as f32));
                    }
                }
            }
        }
        ensure!(
            !lesion_sites.is_empty(),
            "no white-matter voxel with probability ≥ {} at z in {:?} mm for lesions",
            lesions.site_min_wm,
            lesions.site_z_mm
        );

        let inv = invert_affine(&t1.vox_to_mm)?;
        let mm_to_vox: [[f32; 4]; 3] = std::array::from_fn(|r| {
            std::array::from_fn(|c| (inv[r][c] + if c == 3 { pad_lo[r] as f64 } else { 0.0 }) as f32)
        });
        Ok(Anatomy { dims, maps, mm_to_vox, lesion_sites, source })
    }

    /// Template mm → padded voxel coordinates.
    pub fn mm_to_vox(&self) -> &[[f32; 4]; 3] {
        &self.mm_to_vox
    }

    pub fn lesion_sites(&self) -> &[[f32; 3]] {
        &self.lesion_sites
    }

    /// The maps at padded voxel coordinates `v`; `None` outside the grid (air).
    #[inline]
    pub fn sample(&self, v: [f32; 3]) -> Option<Sample> {
        let [na, nb, nc] = self.dims;
        if !(v[0] >= 0.0 && v[1] >= 0.0 && v[2] >= 0.0) {
            return None;
        }
        let (a, b, c) = (v[0] as usize, v[1] as usize, v[2] as usize);
        if a + 1 >= na || b + 1 >= nb || c + 1 >= nc {
            return None;
        }
        let (fa, fb, fc) = (v[0] - a as f32, v[1] - b as f32, v[2] - c as f32);
        let i = (a * nb + b) * nc + c;
        let (sb, sa) = (nc, nb * nc);
        let mut acc = [0f32; 4];
        for (off, w) in [(0, (1.0 - fa) * (1.0 - fb)), (sb, (1.0 - fa) * fb), (sa, fa * (1.0 - fb)), (sa + sb, fa * fb)]
        {
            let lo = self.maps[i + off];
            let hi = self.maps[i + off + 1];
            for ch in 0..4 {
                acc[ch] += w * (lo[ch] as f32 + fc * (hi[ch] as f32 - lo[ch] as f32));
            }
        }
        Some(Sample {
            gm: acc[0] / 255.0,
            wm: acc[1] / 255.0,
            csf: acc[2] / 255.0,
            distance_mm: acc[3] / DISTANCE_STEPS_PER_MM,
        })
    }
}

fn read_member(zip: &mut zip::ZipArchive<File>, wheel: &Path, name: &str) -> Result<Template> {
    let full = format!("{MEMBER_DIR}{name}");
    let mut entry = zip.by_name(&full).map_err(|e| anyhow!("{}: no member {full}: {e}", wheel.display()))?;
    let mut gz = Vec::new();
    entry.read_to_end(&mut gz).with_context(|| format!("{}: cannot read {full}", wheel.display()))?;
    let mut raw = Vec::new();
    MultiGzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .with_context(|| format!("{}: {full} is not gzip", wheel.display()))?;
    let what = || format!("{}: {full}", wheel.display());
    parse_nifti(&raw).with_context(what)
}

fn parse_nifti(raw: &[u8]) -> Result<Template> {
    let mut header = NiftiHeader::from_reader(raw).map_err(|e| anyhow!("bad NIfTI header: {e}"))?;
    // nibabel writes NaN for "no scaling" (these templates do); the nifti crate would multiply by it.
    if !header.scl_slope.is_finite() || header.scl_slope == 0.0 {
        header.scl_slope = 1.0;
        header.scl_inter = 0.0;
    }
    if !header.scl_inter.is_finite() {
        header.scl_inter = 0.0;
    }
    ensure!(header.sform_code > 0, "no sform affine (sform_code {})", header.sform_code);
    let offset = header.vox_offset as usize;
    ensure!(offset >= 348 && offset <= raw.len(), "vox_offset {} outside the {} bytes", header.vox_offset, raw.len());
    let volume =
        InMemNiftiVolume::from_reader(&raw[offset..], &header).map_err(|e| anyhow!("cannot read the volume: {e}"))?;
    let data = volume.into_ndarray::<f32>().map_err(|e| anyhow!("cannot decode the volume: {e}"))?;
    let shape = data.shape().to_vec();
    let data = data.into_dimensionality::<Ix3>().map_err(|_| anyhow!("expected a 3-D volume, got shape {shape:?}"))?;
    let dims = [shape[0], shape[1], shape[2]];
    let vox_to_mm: [[f64; 4]; 3] = [header.srow_x, header.srow_y, header.srow_z].map(|r| r.map(f64::from));
    for ax in 0..3 {
        let len = vox_to_mm.iter().map(|row| row[ax].powi(2)).sum::<f64>().sqrt();
        ensure!((len - 1.0).abs() < 1e-3, "voxels are {len} mm along axis {ax}; the synthesis needs 1 mm");
    }
    // `as_standard_layout` turns NIfTI's Fortran order into the C order the maps use.
    let data = data.as_standard_layout().iter().copied().collect();
    Ok(Template { dims, data, vox_to_mm })
}

fn bounding_box(mask: &[bool], n: [usize; 3]) -> ([usize; 3], [usize; 3]) {
    let mut lo = n;
    let mut hi = [0; 3];
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let idx = [i / (n[1] * n[2]), (i / n[2]) % n[1], i % n[2]];
        for ax in 0..3 {
            lo[ax] = lo[ax].min(idx[ax]);
            hi[ax] = hi[ax].max(idx[ax]);
        }
    }
    (lo, hi)
}

pub fn apply<T: Copy + Into<f64>>(m: &[[T; 4]; 3], p: [f64; 3]) -> [f64; 3] {
    std::array::from_fn(|r| {
        let row = m[r].map(Into::into);
        row[0] * p[0] + row[1] * p[1] + row[2] * p[2] + row[3]
    })
}

fn invert_affine(m: &[[f64; 4]; 3]) -> Result<[[f64; 4]; 3]> {
    let a = |r: usize, c: usize| m[r][c];
    let det = a(0, 0) * (a(1, 1) * a(2, 2) - a(1, 2) * a(2, 1)) - a(0, 1) * (a(1, 0) * a(2, 2) - a(1, 2) * a(2, 0))
        + a(0, 2) * (a(1, 0) * a(2, 1) - a(1, 1) * a(2, 0));
    if det.abs() < 1e-9 {
        bail!("singular affine {m:?}");
    }
    let cof = |r: usize, c: usize| {
        let (r0, r1) = ((r + 1) % 3, (r + 2) % 3);
        let (c0, c1) = ((c + 1) % 3, (c + 2) % 3);
        a(r0, c0) * a(r1, c1) - a(r0, c1) * a(r1, c0)
    };
    Ok(std::array::from_fn(|r| {
        let linear: [f64; 3] = std::array::from_fn(|c| cof(c, r) / det);
        let shift = -(0..3).map(|c| linear[c] * m[c][3]).sum::<f64>();
        [linear[0], linear[1], linear[2], shift]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_inverse_round_trips() {
        let m = [[0.9, 0.1, 0.0, -98.0], [-0.1, 1.1, 0.2, -134.0], [0.05, 0.0, 1.0, -72.0]];
        let inv = invert_affine(&m).unwrap();
        let p = [12.0, -40.5, 33.0];
        let q = apply(&inv, apply(&m, p));
        for ax in 0..3 {
            assert!((q[ax] - p[ax]).abs() < 1e-9, "{q:?}");
        }
    }
}
