//! The reference data preparation: 2-D PNG slices from T1w/FLAIR volume pairs
//! (`create_png_dataset.py`) and the train/validation/test lists (`create_datalist.py`).
//!
//! The pixels are the reference's bit for bit: crop in float64, cast to float32, min-max over the
//! crop in float32, `* 255` truncated to u8. Where the reference would crash or write garbage
//! (no FLAIR, a volume smaller than the crop, a constant or non-finite crop, an unreadable file)
//! the volume is skipped with its reason instead, and the run goes on.
use crate::io::atomic::temporary_path;
use crate::io::volume::SliceReader;
use anyhow::{bail, ensure, Context, Result};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use ndarray::{s, Array3};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// A T1w volume whose path (below the input directory) contains this is never used.
pub const UNUSABLE_MARK: &str = "unusable";
/// Name of the run summary, written next to the lists.
pub const SUMMARY_FILE: &str = "preprocess_summary.json";
/// The list files, in split order.
pub const LIST_FILES: [&str; 3] = ["train.tsv", "validation.tsv", "test.tsv"];

/// A half-open voxel index range `start..end` along one axis (`start:end` on the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl FromStr for Span {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Span> {
        let (a, b) = s.split_once(':').with_context(|| format!("range {s:?}: expected START:END"))?;
        let start = a.trim().parse().with_context(|| format!("range {s:?}: bad start {a:?}"))?;
        let end = b.trim().parse().with_context(|| format!("range {s:?}: bad end {b:?}"))?;
        let span = Span { start, end };
        ensure!(!span.is_empty(), "range {s:?}: END must be greater than START");
        Ok(span)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}", self.start, self.end)
    }
}

/// The crop `[rows, cols, slices]` of every volume. Rows (array axis 0) become the PNG's height,
/// cols (axis 1) its width; one PNG per index of `slices` (axis 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crop {
    pub rows: Span,
    pub cols: Span,
    pub slices: Span,
}

impl Crop {
    /// The reference crop `[16:176, 16:240, 166:171]`: five 160x224 slices.
    pub const REFERENCE: Crop = Crop {
        rows: Span { start: 16, end: 176 },
        cols: Span { start: 16, end: 240 },
        slices: Span { start: 166, end: 171 },
    };

    /// The in-plane box `R0:R1,C0:C1` (axes 0 and 1) around `slices` (axis 2).
    pub fn parse(in_plane: &str, slices: Span) -> Result<Crop> {
        let (r, c) = in_plane.split_once(',').with_context(|| format!("crop {in_plane:?}: expected R0:R1,C0:C1"))?;
        Ok(Crop { rows: r.parse()?, cols: c.parse()?, slices })
    }

    /// The in-plane box as `Crop::parse` reads it: `R0:R1,C0:C1`.
    pub fn in_plane(&self) -> String {
        format!("{},{}", self.rows, self.cols)
    }

    /// The crop `medgen preprocess` cut the PNGs of a data directory with, from the summary it
    /// wrote there; `None` for a directory without one (lists made by hand).
    pub fn of_data(dir: &Path) -> Result<Option<Crop>> {
        let path = dir.join(SUMMARY_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let summary: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let crop: Crop = serde_json::from_value(summary.get("crop").cloned().unwrap_or_default())
            .with_context(|| format!("{}: no valid `crop`", path.display()))?;
        let spans = [crop.rows, crop.cols, crop.slices];
        ensure!(spans.iter().all(|s| !s.is_empty()), "{}: an empty range in the crop {crop}", path.display());
        Ok(Some(crop))
    }

    /// The smallest volume shape the crop fits in.
    pub fn min_shape(&self) -> [usize; 3] {
        [self.rows.end, self.cols.end, self.slices.end]
    }

    pub fn fits(&self, shape: [usize; 3]) -> bool {
        shape.iter().zip(self.min_shape()).all(|(&have, need)| have >= need)
    }
}

impl fmt::Display for Crop {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "[{}, {}, {}]", self.rows, self.cols, self.slices)
    }
}

/// How the sorted subject directories are split into train / validation / the rest (test).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Counts { train: usize, validation: usize },
    Fractions { train: f64, validation: f64 },
}

impl Split {
    /// `create_datalist.py`: the first 35000 directories train, the next 500 validate.
    pub const REFERENCE: Split = Split::Counts { train: 35000, validation: 500 };

    /// (train, validation) sizes for `n` directories; the test split is the rest. A fraction's
    /// size is rounded down (the epsilon keeps `0.29 * 100` at 29).
    pub fn sizes(&self, n: usize) -> (usize, usize) {
        let (train, validation) = match *self {
            Split::Counts { train, validation } => (train, validation),
            Split::Fractions { train, validation } => {
                let of = |f: f64| (n as f64 * f + 1e-9).floor() as usize;
                (of(train), of(validation))
            }
        };
        let train = train.min(n);
        (train, validation.min(n - train))
    }
}

impl FromStr for Split {
    type Err = anyhow::Error;

    /// `A,B`: integers are directory counts, numbers with a `.` are fractions of them.
    fn from_str(s: &str) -> Result<Split> {
        let (a, b) = s.split_once(',').with_context(|| format!("split {s:?}: expected TRAIN,VALIDATION"))?;
        let (a, b) = (a.trim(), b.trim());
        if a.contains('.') || b.contains('.') {
            let parse = |v: &str| -> Result<f64> {
                let f: f64 = v.parse().with_context(|| format!("split {s:?}: bad fraction {v:?}"))?;
                ensure!(f.is_finite() && (0.0..=1.0).contains(&f), "split {s:?}: fraction {v} is not in [0, 1]");
                Ok(f)
            };
            let (train, validation) = (parse(a)?, parse(b)?);
            ensure!(train + validation <= 1.0 + 1e-12, "split {s:?}: the fractions add up to more than 1");
            Ok(Split::Fractions { train, validation })
        } else {
            let parse = |v: &str| -> Result<usize> {
                v.parse().with_context(|| format!("split {s:?}: {v:?} is neither a count nor a fraction"))
            };
            Ok(Split::Counts { train: parse(a)?, validation: parse(b)? })
        }
    }
}

/// Why a volume was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipKind {
    /// The path contains "unusable" (the reference skips these too).
    Unusable,
    /// No FLAIR at the path with `T1w` replaced by `FLAIR` (the reference skips these too).
    MissingFlair,
    /// The file name has no `_T1w.nii`: the reference would make no `.png` name from it.
    BadName,
    /// Not under `<subject>/<session>/`: the reference writes to the file's grandparent directory,
    /// which here would be the output root or above it, where no list reads it.
    Layout,
    /// A later volume writes PNGs of the same names (the reference overwrites; the last one wins).
    Duplicate,
    /// A directory, T1w or FLAIR file that cannot be read or decoded.
    Unreadable,
    /// A volume smaller than the crop.
    TooSmall,
    /// T1w and FLAIR of different shapes.
    ShapeMismatch,
    /// max == min over the crop: the reference divides by zero.
    Constant,
    /// NaN or infinity in the crop (or a range that overflows float32).
    NonFinite,
    /// The PNGs could not be written.
    WriteFailed,
}

impl SkipKind {
    /// The name in the summary JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            SkipKind::Unusable => "unusable",
            SkipKind::MissingFlair => "missing_flair",
            SkipKind::BadName => "bad_name",
            SkipKind::Layout => "layout",
            SkipKind::Duplicate => "duplicate",
            SkipKind::Unreadable => "unreadable",
            SkipKind::TooSmall => "too_small",
            SkipKind::ShapeMismatch => "shape_mismatch",
            SkipKind::Constant => "constant",
            SkipKind::NonFinite => "non_finite",
            SkipKind::WriteFailed => "write_failed",
        }
    }
}

impl Serialize for SkipKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Skip {
    /// The T1w file (or the directory that could not be read).
    pub path: PathBuf,
    pub kind: SkipKind,
    pub reason: String,
}

/// One T1w/FLAIR pair to extract, and the PNGs it makes.
#[derive(Clone, Debug)]
pub struct Job {
    pub t1w: PathBuf,
    pub flair: PathBuf,
    pub out_dir: PathBuf,
    /// `(T1w PNG, FLAIR PNG)` per slice, in slice order.
    pub pngs: Vec<(PathBuf, PathBuf)>,
}

impl Job {
    fn all_written(&self) -> bool {
        self.pngs.iter().all(|(t, f)| t.is_file() && f.is_file())
    }
}

/// What became of one volume.
#[derive(Clone, Debug)]
enum Outcome {
    /// Written; the crop's slice indices (0-based) uniform in T1w or FLAIR.
    Processed(Vec<usize>),
    /// `--resume` found all its PNGs.
    Resumed,
    Skipped(Skip),
}

pub struct Options {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Where the lists and the summary go; the output directory when `None`.
    pub lists: Option<PathBuf>,
    pub crop: Crop,
    pub split: Split,
    /// Leave volumes whose PNGs all exist alone.
    pub resume: bool,
    /// Worker threads; 0 for rayon's default (one per core).
    pub threads: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    /// T1w files found under the input.
    pub found: usize,
    pub processed: usize,
    pub resumed: usize,
    pub skipped: usize,
    pub pngs_written: usize,
    /// Slice pairs written whose T1w or FLAIR is uniform over the crop (`Summary::blank_slices`).
    pub blank_slices: usize,
}

/// The slices of one volume that are uniform over the crop in its T1w or its FLAIR: outside the head
/// of a skull-stripped or zero-padded volume, which a wide `--slices` range reaches. They are written
/// (a list keeps every slice of a volume) and reported, never dropped silently.
#[derive(Clone, Debug, Serialize)]
pub struct BlankSlices {
    pub path: PathBuf,
    /// 0-based, as the PNG names number them.
    pub slices: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ListSummary {
    pub file: PathBuf,
    pub subjects: usize,
    pub rows: usize,
    /// Rows whose FLAIR PNG does not exist (the reference lists them all the same).
    pub missing_flair: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub input: PathBuf,
    pub output: PathBuf,
    pub lists_dir: PathBuf,
    pub crop: Crop,
    pub split: Split,
    pub threads: usize,
    pub counts: Counts,
    /// Wall time of the whole run, and processed volumes per second of it.
    pub seconds: f64,
    pub volumes_per_second: f64,
    pub processed: Vec<PathBuf>,
    pub resumed: Vec<PathBuf>,
    pub skipped: Vec<Skip>,
    pub blank_slices: Vec<BlankSlices>,
    /// train, validation, test; absent when nothing usable was produced (the old lists are kept).
    pub lists: Option<Vec<ListSummary>>,
}

impl Summary {
    /// Volumes whose PNGs exist after the run.
    pub fn usable(&self) -> usize {
        self.counts.processed + self.counts.resumed
    }
}

/// Progress reports of `run`, from its worker threads.
pub trait Progress: Sync {
    /// The number of volumes to extract (or find done), once the input has been searched.
    fn start(&self, _volumes: usize) {}
    /// One of them finished, whatever became of it.
    fn volume_done(&self) {}
}

/// No progress reports.
impl Progress for () {}

/// Extracts the slices of every pair under `opts.input`, writes the lists and the summary
/// (`<lists>/preprocess_summary.json`) and returns it. Errors only for what stops the whole run
/// (no input directory, an output that cannot be created); bad volumes are in `skipped`.
pub fn run(opts: &Options, progress: &dyn Progress) -> Result<Summary> {
    let started = Instant::now();
    ensure!(opts.input.is_dir(), "input {} is not a directory", opts.input.display());
    let input =
        std::path::absolute(&opts.input).with_context(|| format!("cannot make {} absolute", opts.input.display()))?;
    let output = absolute_dir(&opts.output)?;
    let lists_dir = absolute_dir(opts.lists.as_deref().unwrap_or(&output))?;

    let (t1w_files, mut skipped) = find_files(&input, &["T1w.nii.gz", "T1w.nii"]);
    let found = t1w_files.len();
    let (jobs, plan_skips) = plan(&input, &output, &opts.crop, &t1w_files);
    skipped.extend(plan_skips);

    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(opts.threads).build().context("cannot start the worker threads")?;
    let threads = pool.current_num_threads();
    progress.start(jobs.len());
    let outcomes: Vec<Outcome> = pool.install(|| {
        jobs.par_iter()
            .map(|job| {
                let outcome =
                    if opts.resume && job.all_written() { Outcome::Resumed } else { guarded(job, &opts.crop) };
                progress.volume_done();
                outcome
            })
            .collect()
    });

    let (mut processed, mut resumed, mut blank_slices) = (Vec::new(), Vec::new(), Vec::new());
    for (job, outcome) in jobs.iter().zip(outcomes) {
        match outcome {
            Outcome::Processed(blank) => {
                processed.push(job.t1w.clone());
                if !blank.is_empty() {
                    blank_slices.push(BlankSlices { path: job.t1w.clone(), slices: blank });
                }
            }
            Outcome::Resumed => resumed.push(job.t1w.clone()),
            Outcome::Skipped(skip) => skipped.push(skip),
        }
    }
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let counts = Counts {
        found,
        processed: processed.len(),
        resumed: resumed.len(),
        skipped: skipped.len(),
        pngs_written: 2 * opts.crop.slices.len() * processed.len(),
        blank_slices: blank_slices.iter().map(|b| b.slices.len()).sum(),
    };
    let mut summary = Summary {
        input,
        output,
        lists_dir,
        crop: opts.crop,
        split: opts.split,
        threads,
        counts,
        seconds: 0.0,
        volumes_per_second: 0.0,
        processed,
        resumed,
        skipped,
        blank_slices,
        lists: None,
    };
    // The summary is written even when the lists cannot be: it says what was extracted.
    let lists = (summary.usable() > 0).then(|| write_lists(&summary.output, &summary.lists_dir, &opts.split));
    let lists_error = match lists {
        Some(Ok(lists)) => {
            summary.lists = Some(lists);
            None
        }
        Some(Err(e)) => Some(e),
        None => None,
    };
    summary.seconds = started.elapsed().as_secs_f64();
    summary.volumes_per_second = summary.counts.processed as f64 / summary.seconds.max(1e-9);
    let json = serde_json::to_vec_pretty(&summary).context("cannot serialise the summary")?;
    write_atomic(&summary.lists_dir.join(SUMMARY_FILE), &json)?;
    match lists_error {
        Some(e) => Err(e.context("the PNGs were written, the lists were not")),
        None => Ok(summary),
    }
}

/// Creates `dir` and returns it absolute (the lists hold absolute paths, as the reference's do).
fn absolute_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::path::absolute(dir).with_context(|| format!("cannot make {} absolute", dir.display()))
}

/// Files (and links) under `root` whose names end with one of `suffixes`, sorted as Python sorts
/// `Path`s (component by component, which `Path`'s `Ord` also does). Like `Path.glob("**/…")`
/// in Python 3.11 it does not descend into links to directories. Unreadable subdirectories are
/// returned as skips.
pub fn find_files(root: &Path, suffixes: &[&str]) -> (Vec<PathBuf>, Vec<Skip>) {
    let (mut found, mut skipped) = (Vec::new(), Vec::new());
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                let reason = format!("cannot list directory {}: {e}", dir.display());
                skipped.push(Skip { path: dir, kind: SkipKind::Unreadable, reason });
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                stack.push(path);
            } else if entry
                .file_name()
                .to_str()
                // Hidden files are skipped: a killed writer's temporary `.tmp-…_T1w.nii.gz` is not a volume.
                .is_some_and(|n| !n.starts_with('.') && suffixes.iter().any(|s| n.ends_with(s)))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    (found, skipped)
}

/// The reference's names for slice `i`: `…_T1w.nii` in the name without `.gz` becomes
/// `…_slice-{i}_T1w.png` (every occurrence, as `str.replace`). For `.nii` files the whole name is
/// used, so `x_T1w.nii` gives the same names as `x_T1w.nii.gz`; the reference, which only reads
/// `.nii.gz`, would have made no `.png` name from it. `None` when the name has no `_T1w.nii`.
pub fn slice_png_name(volume_name: &str, modality: &str, i: usize) -> Option<String> {
    let stem = volume_name.strip_suffix(".gz").unwrap_or(volume_name);
    let pattern = format!("_{modality}.nii");
    stem.contains(&pattern).then(|| stem.replace(&pattern, &format!("_slice-{i}_{modality}.png")))
}

/// Pairs each T1w file with its FLAIR and its output names, or says why it cannot be used.
/// The FLAIR is the path below `input` with every `T1w` replaced by `FLAIR` (the reference
/// replaces in its full path, whose root `/source_data/` has none).
pub fn plan(input: &Path, output: &Path, crop: &Crop, t1w_files: &[PathBuf]) -> (Vec<Job>, Vec<Skip>) {
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for t1w in t1w_files {
        match plan_one(input, output, crop, t1w) {
            Ok(job) => jobs.push(job),
            Err((kind, reason)) => skipped.push(Skip { path: t1w.clone(), kind, reason }),
        }
    }
    // The reference writes in sorted order, so of two volumes with the same PNG names the last
    // one's are left on disk; writing both in parallel would race.
    let mut owner: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut kept = Vec::with_capacity(jobs.len());
    for job in jobs.into_iter().rev() {
        let taken = job.pngs.iter().flat_map(|(t, f)| [t, f]).find_map(|p| owner.get(p).map(|o| (p, o)));
        if let Some((png, by)) = taken {
            let reason =
                format!("its PNG {} is also written by {}, which comes later and wins", png.display(), by.display());
            skipped.push(Skip { path: job.t1w.clone(), kind: SkipKind::Duplicate, reason });
            continue;
        }
        for (t, f) in &job.pngs {
            owner.insert(t.clone(), job.t1w.clone());
            owner.insert(f.clone(), job.t1w.clone());
        }
        kept.push(job);
    }
    kept.reverse();
    (kept, skipped)
}

fn plan_one(input: &Path, output: &Path, crop: &Crop, t1w: &Path) -> Result<Job, (SkipKind, String)> {
    let rel =
        t1w.strip_prefix(input).map_err(|_| (SkipKind::Layout, format!("{} is outside the input", t1w.display())))?;
    let rel_str = rel.to_str().ok_or((SkipKind::BadName, "the path is not valid UTF-8".to_string()))?;
    if rel_str.contains(UNUSABLE_MARK) {
        return Err((SkipKind::Unusable, format!("the path contains {UNUSABLE_MARK:?}")));
    }
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if slice_png_name(name, "T1w", 0).is_none() {
        return Err((SkipKind::BadName, format!("the file name {name:?} has no \"_T1w.nii\" to make PNG names from")));
    }
    // parents[1] of the reference: the session directory of sub-X/ses-Y/anat/file.
    let sub_dir = match rel.parent().and_then(Path::parent) {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => {
            let reason = "not at least two directories deep: the reference writes the PNGs to the file's \
                          grandparent directory (sub-X/ses-Y for sub-X/ses-Y/anat/file), here the output \
                          root or above, where no list reads them";
            return Err((SkipKind::Layout, reason.to_string()));
        }
    };
    let flair = input.join(rel_str.replace("T1w", "FLAIR"));
    if !flair.exists() {
        return Err((SkipKind::MissingFlair, format!("no FLAIR at {}", flair.display())));
    }
    let flair_name = flair.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let out_dir = output.join(sub_dir);
    let mut pngs = Vec::with_capacity(crop.slices.len());
    for i in 0..crop.slices.len() {
        // Both exist: "_T1w.nii" in the T1w name is "_FLAIR.nii" in the FLAIR's.
        let (Some(t), Some(f)) = (slice_png_name(name, "T1w", i), slice_png_name(flair_name, "FLAIR", i)) else {
            return Err((SkipKind::BadName, format!("no PNG names for {name:?} / {flair_name:?}")));
        };
        pngs.push((out_dir.join(t), out_dir.join(f)));
    }
    Ok(Job { t1w: t1w.to_path_buf(), flair, out_dir, pngs })
}

/// `process`, with a panic in a decoder turned into a skip instead of ending the run.
fn guarded(job: &Job, crop: &Crop) -> Outcome {
    let (kind, reason) = match crate::panics::catch(|| process(job, crop)) {
        Ok(Ok(blank)) => return Outcome::Processed(blank),
        Ok(Err(e)) => e,
        Err(msg) => {
            (SkipKind::Unreadable, format!("reading {} or {} failed: {msg}", job.t1w.display(), job.flair.display()))
        }
    };
    Outcome::Skipped(Skip { path: job.t1w.clone(), kind, reason })
}

fn process(job: &Job, crop: &Crop) -> Result<Vec<usize>, (SkipKind, String)> {
    // Each volume is scaled before the next is read: only one float64 volume per thread in memory.
    let (t1w_shape, t1w) = load_scaled(&job.t1w, crop)?;
    let (flair_shape, flair) = load_scaled(&job.flair, crop)?;
    if t1w_shape != flair_shape {
        let reason = format!(
            "T1w {} has shape {t1w_shape:?}, FLAIR {} has shape {flair_shape:?}",
            job.t1w.display(),
            job.flair.display(),
        );
        return Err((SkipKind::ShapeMismatch, reason));
    }
    write_slices(job, &t1w, &flair).map_err(|e| {
        // Half a volume's slices would reach the lists; none of them is better.
        for png in job.pngs.iter().flat_map(|(t, f)| [t, f]) {
            let _ = std::fs::remove_file(png);
        }
        (SkipKind::WriteFailed, format!("{e:#}"))
    })?;
    let uniform = |x: &Array3<u8>, k: usize| {
        let slice = x.slice(s![.., .., k]);
        let first = slice.first().copied();
        slice.iter().all(|&v| Some(v) == first)
    };
    Ok((0..t1w.dim().2).filter(|&k| uniform(&t1w, k) || uniform(&flair, k)).collect())
}

/// Reads the crop's slices of a volume (after checking the crop fits) and scales the crop
/// (`normalize`); returns the volume's full shape.
fn load_scaled(path: &Path, crop: &Crop) -> Result<([usize; 3], Array3<u8>), (SkipKind, String)> {
    let unreadable = |e: anyhow::Error| (SkipKind::Unreadable, format!("{e:#}"));
    let reader = SliceReader::open(path).map_err(unreadable)?;
    let shape = reader.dims();
    if !crop.fits(shape) {
        let need = crop.min_shape();
        let reason =
            format!("{} has shape {shape:?}, smaller than the crop {crop} (needs at least {need:?})", path.display());
        return Err((SkipKind::TooSmall, reason));
    }
    let slope = reader.header.scl_slope;
    let slab = reader.read_slices(crop.slices.start, crop.slices.end).map_err(unreadable)?;
    let scaled = normalize_slab(slab.view(), crop).map_err(|(kind, reason)| {
        // nibabel reads a file whose scl_slope is NaN or infinite unscaled; volume.rs applies it.
        let note = if kind == SkipKind::NonFinite && !slope.is_finite() {
            format!(" (its scl_slope is {slope}, which nibabel would ignore)")
        } else {
            String::new()
        };
        (kind, format!("{}: {reason}{note}", path.display()))
    })?;
    Ok((shape, scaled))
}

/// The reference's intensity scaling of one volume's crop, voxel for voxel: cropped in float64,
/// cast to float32, `(x - min) / (max - min)` and `* 255` in float32, truncated to u8 as numpy's
/// `astype(uint8)` does for values in [0, 255]. The crop must fit (`Crop::min_shape`).
pub fn normalize(data: &Array3<f64>, crop: &Crop) -> Result<Array3<u8>, (SkipKind, String)> {
    normalize_slab(data.slice(s![.., .., crop.slices.start..crop.slices.end]), crop)
}

/// [`normalize`] of the crop's slices alone (`slab[:, :, 0]` is slice `crop.slices.start`).
pub fn normalize_slab(slab: ndarray::ArrayView3<f64>, crop: &Crop) -> Result<Array3<u8>, (SkipKind, String)> {
    let x = slab.slice(s![crop.rows.start..crop.rows.end, crop.cols.start..crop.cols.end, ..]).mapv(|v| v as f32);
    let (mut lo, mut hi, mut bad) = (f32::INFINITY, f32::NEG_INFINITY, 0usize);
    let mut first_bad = None;
    for (idx, &v) in x.indexed_iter() {
        if !v.is_finite() {
            bad += 1;
            first_bad.get_or_insert(idx);
            continue;
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if let Some((i, j, k)) = first_bad {
        let at = [i + crop.rows.start, j + crop.cols.start, k + crop.slices.start];
        let v = x[[i, j, k]];
        return Err((
            SkipKind::NonFinite,
            format!("{bad} non-finite value(s) in the crop as float32 (first: {v} at {at:?})"),
        ));
    }
    let range = hi - lo;
    if range == 0.0 {
        return Err((SkipKind::Constant, format!("constant ({lo}) over the crop: the reference divides by zero")));
    }
    if !range.is_finite() {
        return Err((SkipKind::NonFinite, format!("the range {lo}..{hi} overflows float32")));
    }
    Ok(x.mapv(|v| ((v - lo) / range * 255.0) as u8))
}

/// Slice `k` as a row-major `rows x cols` image: `Image.fromarray(x[:, :, k])`.
fn slice_pixels(x: &Array3<u8>, k: usize) -> Vec<u8> {
    x.slice(s![.., .., k]).iter().copied().collect()
}

fn write_slices(job: &Job, t1w: &Array3<u8>, flair: &Array3<u8>) -> Result<()> {
    std::fs::create_dir_all(&job.out_dir).with_context(|| format!("cannot create {}", job.out_dir.display()))?;
    let (height, width, _) = t1w.dim();
    for (k, (t1w_png, flair_png)) in job.pngs.iter().enumerate() {
        write_atomic(t1w_png, &encode_png(&slice_pixels(t1w, k), width, height)?)?;
        write_atomic(flair_png, &encode_png(&slice_pixels(flair, k), width, height)?)?;
    }
    Ok(())
}

/// An 8-bit grayscale PNG (PIL mode "L").
pub fn encode_png(pixels: &[u8], width: usize, height: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    PngEncoder::new(&mut buf)
        .write_image(pixels, width as u32, height as u32, ExtendedColorType::L8)
        .with_context(|| format!("cannot encode a {width}x{height} PNG"))?;
    Ok(buf)
}

/// Writes a temporary file in the same directory, then renames it into place. The temporary
/// name ends in `.part` so that a run killed midway leaves nothing the lists would pick up.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temporary_path(path)?.into_os_string();
    tmp.push(".part");
    let tmp = PathBuf::from(tmp);
    let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", tmp.display());
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// `create_datalist.py`: the sorted directories directly under `output` (but `lists_dir`) are
/// split by `split`; each split lists, per directory, its `*T1w.png` files at any depth in sorted
/// order with the FLAIR named by replacing `T1w` with `FLAIR`. The reference (pandas) writes an
/// empty split as a single blank line; here it keeps its header.
pub fn write_lists(output: &Path, lists_dir: &Path, split: &Split) -> Result<Vec<ListSummary>> {
    let entries = std::fs::read_dir(output).with_context(|| format!("cannot list {}", output.display()))?;
    let mut sub_dirs: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("cannot list {}", output.display()))?.path();
        if path.is_dir() && path != lists_dir {
            sub_dirs.push(path);
        }
    }
    sub_dirs.sort();
    let (n_train, n_val) = split.sizes(sub_dirs.len());
    let groups = [&sub_dirs[..n_train], &sub_dirs[n_train..n_train + n_val], &sub_dirs[n_train + n_val..]];
    let mut summaries = Vec::new();
    for (file, dirs) in LIST_FILES.iter().zip(groups) {
        let (tsv, rows, missing_flair) = list_rows(dirs)?;
        let path = lists_dir.join(file);
        write_atomic(&path, &tsv)?;
        summaries.push(ListSummary { file: path, subjects: dirs.len(), rows, missing_flair });
    }
    Ok(summaries)
}

/// The TSV text of one split, its row count and how many rows name a FLAIR that does not exist.
fn list_rows(dirs: &[PathBuf]) -> Result<(Vec<u8>, usize, usize)> {
    let mut tsv = b"t1w\tflair\n".to_vec();
    let (mut rows, mut missing) = (0, 0);
    for dir in dirs {
        let (pngs, unreadable) = find_files(dir, &["T1w.png"]);
        // A list silently missing part of a subject is worse than no list.
        if let Some(skip) = unreadable.first() {
            bail!("{}", skip.reason);
        }
        for t1w in pngs {
            let name = t1w.file_name().map(|n| n.to_string_lossy().replace("T1w", "FLAIR")).unwrap_or_default();
            let flair = t1w.with_file_name(name);
            missing += usize::from(!flair.is_file());
            tsv.extend(tsv_field(&t1w));
            tsv.push(b'\t');
            tsv.extend(tsv_field(&flair));
            tsv.push(b'\n');
            rows += 1;
        }
    }
    Ok((tsv, rows, missing))
}

/// A path as pandas' `to_csv(sep="\t")` writes it: quoted (quotes doubled) only when it holds a
/// tab, a quote or a line break.
fn tsv_field(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if !bytes.iter().any(|b| matches!(b, b'\t' | b'"' | b'\n' | b'\r')) {
        return bytes.to_vec();
    }
    let mut out = vec![b'"'];
    for &b in bytes {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_crop_and_split() {
        let slices: Span = "166:171".parse().unwrap();
        assert_eq!(Crop::parse("16:176,16:240", slices).unwrap(), Crop::REFERENCE);
        assert!(Crop::parse("16:176", slices).is_err());
        assert!(Crop::parse("16:176,16", slices).is_err());
        assert!("171:166".parse::<Span>().is_err());
        assert!("5:5".parse::<Span>().is_err());
        assert_eq!("3,2".parse::<Split>().unwrap(), Split::Counts { train: 3, validation: 2 });
        assert_eq!("0.8,0.1".parse::<Split>().unwrap(), Split::Fractions { train: 0.8, validation: 0.1 });
        assert_eq!("0.8,0".parse::<Split>().unwrap(), Split::Fractions { train: 0.8, validation: 0.0 });
        for bad in ["0.9,0.2", "1.5,0", "-1,2", "a,b", "3", "nan,0.1"] {
            assert!(bad.parse::<Split>().is_err(), "{bad}");
        }
    }

    #[test]
    fn split_sizes() {
        assert_eq!(Split::REFERENCE.sizes(10), (10, 0));
        assert_eq!(Split::REFERENCE.sizes(35600), (35000, 500));
        assert_eq!(Split::Counts { train: 3, validation: 9 }.sizes(5), (3, 2));
        assert_eq!(Split::Fractions { train: 0.8, validation: 0.1 }.sizes(10), (8, 1));
        assert_eq!(Split::Fractions { train: 0.29, validation: 0.0 }.sizes(100), (29, 0));
        assert_eq!(Split::Fractions { train: 0.5, validation: 0.5 }.sizes(3), (1, 1));
    }

    #[test]
    fn png_names_follow_the_reference() {
        assert_eq!(slice_png_name("sub-X_ses-Y_T1w.nii.gz", "T1w", 0).unwrap(), "sub-X_ses-Y_slice-0_T1w.png");
        assert_eq!(slice_png_name("sub-X_ses-Y_FLAIR.nii.gz", "FLAIR", 4).unwrap(), "sub-X_ses-Y_slice-4_FLAIR.png");
        assert_eq!(slice_png_name("sub-X_T1w.nii", "T1w", 2).unwrap(), "sub-X_slice-2_T1w.png");
        assert_eq!(slice_png_name("a_T1w.nii_T1w.nii.gz", "T1w", 1).unwrap(), "a_slice-1_T1w.png_slice-1_T1w.png");
        assert!(slice_png_name("sub-XT1w.nii.gz", "T1w", 0).is_none());
    }

    #[test]
    fn normalize_is_numpy_float32() {
        let crop = Crop {
            rows: Span { start: 0, end: 2 },
            cols: Span { start: 0, end: 2 },
            slices: Span { start: 0, end: 1 },
        };
        // 0.1 + 0.2 style rounding: the float64 values are cast to float32 before the scaling.
        let data = Array3::from_shape_vec((2, 2, 1), vec![0.1, 0.2, 0.3, 1.0 / 3.0]).unwrap();
        let got = normalize(&data, &crop).unwrap();
        let (lo, hi) = (0.1f64 as f32, (1.0f64 / 3.0) as f32);
        let want: Vec<u8> =
            [0.1f64, 0.2, 0.3, 1.0 / 3.0].iter().map(|&v| (((v as f32) - lo) / (hi - lo) * 255.0) as u8).collect();
        assert_eq!(got.iter().copied().collect::<Vec<_>>(), want);
        assert_eq!(got[[1, 1, 0]], 255);
        let constant = Array3::from_elem((2, 2, 1), 7.0);
        assert_eq!(normalize(&constant, &crop).unwrap_err().0, SkipKind::Constant);
        let mut nan = data.clone();
        nan[[0, 1, 0]] = f64::NAN;
        assert_eq!(normalize(&nan, &crop).unwrap_err().0, SkipKind::NonFinite);
        let huge = Array3::from_shape_vec((2, 2, 1), vec![1e300, 0.0, 0.0, 0.0]).unwrap();
        assert_eq!(normalize(&huge, &crop).unwrap_err().0, SkipKind::NonFinite);
        let wide = Array3::from_shape_vec((2, 2, 1), vec![-3e38, 3e38, 0.0, 0.0]).unwrap();
        assert_eq!(normalize(&wide, &crop).unwrap_err().0, SkipKind::NonFinite);
    }

    #[test]
    fn tsv_quoting() {
        assert_eq!(tsv_field(Path::new("/a/b c.png")), b"/a/b c.png");
        assert_eq!(tsv_field(Path::new("/a/b\t\"c.png")), b"\"/a/b\t\"\"c.png\"");
    }
}
