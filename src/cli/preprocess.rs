use crate::data::preprocess::{self, Crop, Progress, Span, Split, SUMMARY_FILE};
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory searched recursively for `*T1w.nii.gz` / `*T1w.nii` (FLAIR: `T1w` replaced by `FLAIR`).
    #[arg(long)]
    input: PathBuf,
    /// PNG directory: `<T1w file's grandparent below --input>/<name>_slice-<i>_{T1w,FLAIR}.png`, e.g.
    /// `sub-X/ses-Y/sub-X_ses-Y_slice-0_T1w.png` for `sub-X/ses-Y/anat/sub-X_ses-Y_T1w.nii.gz`.
    #[arg(long)]
    output: PathBuf,
    /// Where train.tsv, validation.tsv, test.tsv and preprocess_summary.json go [default: --output].
    #[arg(long)]
    lists: Option<PathBuf>,
    /// In-plane crop `R0:R1,C0:C1` of array axes 0 (PNG height) and 1 (PNG width).
    #[arg(long, default_value = "16:176,16:240")]
    crop: String,
    /// Slices `S0:S1` of array axis 2, one PNG pair each, numbered from 0.
    #[arg(long, default_value = "166:171")]
    slices: Span,
    /// Subject directories for train,validation (the rest is test): counts (`35000,500`) or
    /// fractions (`0.8,0.1`).
    #[arg(long, default_value = "35000,500")]
    split: Split,
    /// Leave volumes whose PNGs all exist alone (counted as done).
    #[arg(long)]
    resume: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    let crop = Crop::parse(&a.crop, a.slices)?;
    let opts = preprocess::Options {
        input: a.input,
        output: a.output,
        lists: a.lists,
        crop,
        split: a.split,
        resume: a.resume,
        threads: a.threads,
    };
    let bar = Bar(ProgressBar::hidden());
    let summary = preprocess::run(&opts, &bar)?;
    bar.0.finish_and_clear();

    for skip in &summary.skipped {
        eprintln!("skipped {} ({}): {}", skip.path.display(), skip.kind.as_str(), skip.reason);
    }
    let c = &summary.counts;
    println!(
        "{} T1w volumes found: {} processed ({} PNGs), {} already done, {} skipped; {:.1} s, {:.2} volumes/s on {} \
         threads",
        c.found,
        c.processed,
        c.pngs_written,
        c.resumed,
        c.skipped,
        summary.seconds,
        summary.volumes_per_second,
        summary.threads
    );
    if c.blank_slices > 0 {
        println!(
            "note: {} slice pairs in {} volumes are uniform over the crop in T1w or FLAIR (outside the head?): \
             written and listed all the same; see blank_slices in the summary, or narrow --slices",
            c.blank_slices,
            summary.blank_slices.len()
        );
    }
    for list in summary.lists.iter().flatten() {
        let missing = match list.missing_flair {
            0 => String::new(),
            n => format!(", {n} without their FLAIR PNG"),
        };
        println!("{}: {} subjects, {} slices{missing}", list.file.display(), list.subjects, list.rows);
    }
    let summary_path = summary.lists_dir.join(SUMMARY_FILE);
    println!("summary: {}", summary_path.display());
    if summary.usable() == 0 {
        bail!(
            "nothing usable: none of the {} T1w volumes under {} was processed (see {})",
            c.found,
            summary.input.display(),
            summary_path.display()
        );
    }
    Ok(())
}

/// An indicatif bar on stderr, sized once the volumes are known.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, volumes: usize) {
        self.0.set_length(volumes as u64);
        let style = ProgressStyle::with_template("{bar:40} {pos}/{len} volumes [{elapsed_precise}<{eta}] {per_sec}");
        if let Ok(style) = style {
            self.0.set_style(style);
        }
        self.0.set_draw_target(ProgressDrawTarget::stderr());
    }

    fn volume_done(&self) {
        self.0.inc(1);
    }
}
