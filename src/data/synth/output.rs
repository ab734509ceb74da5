//! What a data set looks like on disk: BIDS-like paths, int16 NIfTI volumes and `synth.json`.
use super::anatomy::AnatomySource;
use super::params::SynthParams;
use crate::io::atomic::temporary_path;
use anyhow::{anyhow, bail, Context, Result};
use ndarray::Array3;
use nifti::writer::WriterOptions;
use nifti::NiftiHeader;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "synth.json";
pub const SESSION: &str = "ses-01";
/// Subject labels have four digits so that directory order is subject order, as the reference's
/// split by sorted directory name expects.
pub const MAX_SUBJECTS: usize = 9999;

pub fn subject_label(number: usize) -> String {
    format!("sub-{number:04}")
}

/// `(T1w, FLAIR)` paths of subject `number` (1-based).
pub fn subject_paths(output: &Path, number: usize) -> (PathBuf, PathBuf) {
    let sub = subject_label(number);
    let dir = output.join(&sub).join(SESSION).join("anat");
    (dir.join(format!("{sub}_{SESSION}_T1w.nii.gz")), dir.join(format!("{sub}_{SESSION}_FLAIR.nii.gz")))
}

/// Scanner coordinates with the isocentre at the crop centre, axes RAS, 1 mm.
pub fn header(crop_centre: [f64; 3], description: &str) -> Result<NiftiHeader> {
    let mut h = NiftiHeader::default();
    let offset = crop_centre.map(|c| -c as f32);
    h.pixdim = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    h.xyzt_units = 2 | 8; // mm, s
    h.qform_code = 1;
    h.sform_code = 1;
    h.quatern_b = 0.0;
    h.quatern_c = 0.0;
    h.quatern_d = 0.0;
    h.quatern_x = offset[0];
    h.quatern_y = offset[1];
    h.quatern_z = offset[2];
    h.srow_x = [1.0, 0.0, 0.0, offset[0]];
    h.srow_y = [0.0, 1.0, 0.0, offset[1]];
    h.srow_z = [0.0, 0.0, 1.0, offset[2]];
    h.set_description_str(description).map_err(|e| anyhow!("NIfTI description {description:?}: {e}"))?;
    Ok(h)
}

/// Removes what a killed run left half-written in `dir` (temporary names start with `.tmp-`, and
/// end like the real files, so a `**/*T1w.nii.gz` search would find them). One run per data set.
pub fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let path = entry.path();
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// Writes an int16 `.nii.gz` under a temporary name and renames it into place.
pub fn write_int16(path: &Path, data: &Array3<i16>, header: &NiftiHeader) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = temporary_path(path)?;
    // zlib-rs's level 1 uses static Huffman codes, which leave noise half compressed; level 3 is
    // 35 % smaller for little more time (level 6 saves 5 % more at several times the time).
    let written = WriterOptions::new(&tmp)
        .reference_header(header)
        .compression_level(flate2::Compression::new(3))
        .write_nifti(data)
        .map_err(|e| anyhow!("{}: cannot write NIfTI: {e}", tmp.display()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// `synth.json`: enough to make the same data set again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub generator: String,
    pub synth_version: u32,
    pub medgen_version: String,
    pub seed: u64,
    pub subjects: usize,
    pub layout: String,
    pub anatomy: AnatomySource,
    pub params: SynthParams,
}

impl Manifest {
    pub fn new(anatomy: AnatomySource, params: &SynthParams, seed: u64, subjects: usize) -> Manifest {
        Manifest {
            generator: "medgen synth".into(),
            synth_version: super::SYNTH_VERSION,
            medgen_version: env!("CARGO_PKG_VERSION").into(),
            seed,
            subjects,
            layout: format!(
                "sub-NNNN/{SESSION}/anat/sub-NNNN_{SESSION}_{{T1w,FLAIR}}.nii.gz, int16, grid {:?} at 1 mm RAS",
                params.grid.dims
            ),
            anatomy,
            params: params.clone(),
        }
    }
}

pub fn write_manifest(output: &Path, manifest: &Manifest) -> Result<()> {
    let path = output.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(manifest)?;
    crate::io::atomic::write_bytes(&path, (text + "\n").as_bytes())
}

/// On `--resume`: the data set already there must have been made the same way (the subject count
/// may differ), else the directory would mix two data sets.
pub fn check_resumable(output: &Path, manifest: &Manifest) -> Result<()> {
    let path = output.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let old: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let mut new = serde_json::to_value(manifest)?;
    for ignored in ["subjects", "medgen_version"] {
        if let Some(o) = new.as_object_mut() {
            o.remove(ignored);
        }
    }
    if let Some((key, was, now)) = first_difference("", &old, &new) {
        bail!(
            "{} was written with {key} = {was}, this run has {now}: resuming would mix two data sets \
             (use another --output, or drop --resume to overwrite)",
            path.display()
        );
    }
    Ok(())
}

/// The first key of `new` whose value differs in `old` (missing counts as different).
fn first_difference(
    prefix: &str,
    old: &serde_json::Value,
    new: &serde_json::Value,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => n.iter().find_map(|(k, v)| {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match o.get(k) {
                Some(ov) => first_difference(&key, ov, v),
                None => Some((key, "(absent)".into(), v.to_string())),
            }
        }),
        _ if old == new => None,
        _ => Some((prefix.to_string(), old.to_string(), new.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_are_named() {
        let old = json!({"seed": 0, "params": {"a": {"b": 1.5, "c": [1, 2]}}});
        assert_eq!(first_difference("", &old, &old), None);
        let new = json!({"seed": 0, "params": {"a": {"b": 1.5, "c": [1, 3]}}});
        assert_eq!(first_difference("", &old, &new), Some(("params.a.c".into(), "[1,2]".into(), "[1,3]".into())));
        let new = json!({"seed": 0, "extra": true});
        assert_eq!(first_difference("", &old, &new).unwrap().0, "extra");
    }

    #[test]
    fn paths_are_bids_like() {
        let (t1, fl) = subject_paths(Path::new("out"), 7);
        assert_eq!(t1, Path::new("out/sub-0007/ses-01/anat/sub-0007_ses-01_T1w.nii.gz"));
        assert_eq!(fl.to_str().unwrap().replace("FLAIR", "T1w"), t1.to_str().unwrap());
    }
}
