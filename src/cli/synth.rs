use crate::data::synth::{self, Options, Progress, MANIFEST_FILE};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The nilearn 0.14.1 wheel holding the ICBM 2009a template (`make setup` downloads it).
    #[arg(long)]
    nilearn_wheel: PathBuf,
    /// Data set root: `sub-NNNN/ses-01/anat/sub-NNNN_ses-01_{T1w,FLAIR}.nii.gz` and synth.json.
    #[arg(long)]
    output: PathBuf,
    /// Number of subjects, sub-0001 to sub-NNNN (a subject does not depend on this count).
    #[arg(long, default_value_t = 200)]
    subjects: usize,
    /// Data set seed: the same seed and subject number give byte-identical volumes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave subjects whose two volumes exist alone (the data set must have the same seed and parameters).
    #[arg(long)]
    resume: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    let opts = Options {
        wheel: a.nilearn_wheel,
        output: a.output,
        subjects: a.subjects,
        seed: a.seed,
        resume: a.resume,
        threads: a.threads,
    };
    let bar = Bar(ProgressBar::hidden());
    let summary = synth::run(&opts, &bar)?;
    bar.0.finish_and_clear();
    println!(
        "{} subjects written, {} already there; {:.1} s ({:.2} s per subject on {} threads); parameters in {}",
        summary.written,
        summary.resumed,
        summary.seconds,
        summary.seconds / summary.written.max(1) as f64,
        summary.threads,
        opts.output.join(MANIFEST_FILE).display()
    );
    Ok(())
}

/// An indicatif bar on stderr, sized once the subjects are known.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, subjects: usize) {
        self.0.set_length(subjects as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} subjects [{elapsed_precise}<{eta}]") {
            self.0.set_style(style);
        }
        self.0.set_draw_target(ProgressDrawTarget::stderr());
    }

    fn subject_done(&self) {
        self.0.inc(1);
    }
}
