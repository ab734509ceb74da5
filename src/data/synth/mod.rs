//! `medgen synth`: the embedded default data set. Synthetic FLAIR/T1w pairs on real anatomy (the
//! ICBM 2009a template in the nilearn wheel), one random subject per (seed, subject number):
//! pose and size, a smooth deformation with variable ventricles, white-matter lesions, per-subject
//! relaxation times, skull and scalp, a bias field and Rician noise.
//!
//! Grid: 176 × 240 × 256 voxels of 1 mm, axes left→right, posterior→anterior, inferior→superior
//! (RAS), so the reference crop `[16:176, 16:240, 166:171]` is five axial slices through the
//! bodies of the lateral ventricles, with anterior–posterior along its 224-pixel axis; the whole
//! head is synthesised, the neck is not (below the cerebellum there is air).
pub mod anatomy;
mod edt;
mod field;
pub mod output;
pub mod params;
pub mod signal;
mod subject;

pub use anatomy::{Anatomy, AnatomySource};
pub use output::{subject_label, subject_paths, Manifest, MANIFEST_FILE};
pub use params::SynthParams;
pub use signal::Tissue;
pub use subject::{SubjectSummary, SubjectVolumes, MIXED, PURE_FRACTION};

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Bumped whenever a change makes the same seed give different volumes.
pub const SYNTH_VERSION: u32 = 1;

/// The anatomy and parameters subjects are drawn from.
pub struct Synthesizer {
    pub anatomy: Anatomy,
    pub params: SynthParams,
}

impl Synthesizer {
    /// Reads the template from the wheel and derives the anatomy (a few seconds).
    pub fn new(wheel: &Path, params: SynthParams) -> Result<Synthesizer> {
        let anatomy = Anatomy::from_wheel(wheel, &params.head, &params.lesions)?;
        Ok(Synthesizer { anatomy, params })
    }

    /// Subject `number` (1-based) of the data set made with `seed`, its slices rendered in
    /// parallel; with `labels`, its tissue labels too.
    pub fn subject(&self, seed: u64, number: usize, labels: bool) -> SubjectVolumes {
        subject::Subject::draw(&self.anatomy, &self.params, seed, number).synthesize(&self.anatomy, labels, true)
    }

    pub fn manifest(&self, seed: u64, subjects: usize) -> Manifest {
        Manifest::new(self.anatomy.source.clone(), &self.params, seed, subjects)
    }

    /// Renders subject `number` and writes its pair (`parallel`: spread its slices over the threads).
    pub fn write_subject(&self, output: &Path, seed: u64, number: usize, parallel: bool) -> Result<()> {
        let v = subject::Subject::draw(&self.anatomy, &self.params, seed, number).synthesize(
            &self.anatomy,
            false,
            parallel,
        );
        let (t1w_path, flair_path) = subject_paths(output, number);
        if let Some(dir) = t1w_path.parent() {
            output::remove_stale_temporaries(dir)?;
        }
        let label = subject_label(number);
        let centre = self.params.grid.crop_centre_vox;
        let describe = |contrast: &str| format!("medgen synth v{SYNTH_VERSION} seed {seed} {label} {contrast}");
        let t1w_header = output::header(centre, &describe("T1w"))?;
        let flair_header = output::header(centre, &describe("FLAIR"))?;
        let (a, b) = rayon::join(
            || output::write_int16(&t1w_path, &v.t1w, &t1w_header),
            || output::write_int16(&flair_path, &v.flair, &flair_header),
        );
        a.and(b).with_context(|| format!("writing {label}"))
    }
}

pub struct Options {
    pub wheel: PathBuf,
    pub output: PathBuf,
    pub subjects: usize,
    pub seed: u64,
    pub resume: bool,
    /// Worker threads, 0 for one per core.
    pub threads: usize,
}

/// Progress reports of `run`, from its worker threads.
pub trait Progress: Sync {
    fn start(&self, _subjects: usize) {}
    fn subject_done(&self) {}
}

impl Progress for () {}

#[derive(Debug, Clone)]
pub struct Summary {
    pub written: usize,
    pub resumed: usize,
    pub seconds: f64,
    pub threads: usize,
}

/// Writes `synth.json` and the subjects (those already complete are left alone with `resume`).
pub fn run(opts: &Options, progress: &dyn Progress) -> Result<Summary> {
    ensure!(opts.subjects >= 1, "--subjects must be at least 1");
    ensure!(
        opts.subjects <= output::MAX_SUBJECTS,
        "--subjects {} is more than {}: labels have four digits",
        opts.subjects,
        output::MAX_SUBJECTS
    );
    let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads).build().context("cannot start threads")?;
    pool.install(|| {
        let started = Instant::now();
        let params = SynthParams::default();
        let manifest = Manifest::new(AnatomySource::of_wheel(&opts.wheel)?, &params, opts.seed, opts.subjects);
        if opts.resume {
            output::check_resumable(&opts.output, &manifest)?;
        }
        let synth = Synthesizer::new(&opts.wheel, params)?;
        std::fs::create_dir_all(&opts.output).with_context(|| format!("cannot create {}", opts.output.display()))?;
        output::write_manifest(&opts.output, &manifest)?;

        let done = |n: usize| {
            let (t, f) = subject_paths(&opts.output, n);
            t.is_file() && f.is_file()
        };
        let todo: Vec<usize> = (1..=opts.subjects).filter(|&n| !(opts.resume && done(n))).collect();
        let resumed = opts.subjects - todo.len();
        progress.start(opts.subjects);
        for _ in 0..resumed {
            progress.subject_done();
        }
        // One subject per thread when there are enough of them; otherwise each subject's slices
        // are spread over the threads.
        let threads = rayon::current_num_threads();
        let parallel_slices = todo.len() < threads;
        let written = AtomicUsize::new(0);
        todo.par_iter().with_max_len(1).try_for_each(|&n| -> Result<()> {
            synth.write_subject(&opts.output, opts.seed, n, parallel_slices)?;
            written.fetch_add(1, Ordering::Relaxed);
            progress.subject_done();
            Ok(())
        })?;
        Ok(Summary { written: written.into_inner(), resumed, seconds: started.elapsed().as_secs_f64(), threads })
    })
}
