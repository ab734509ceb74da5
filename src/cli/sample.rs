//! `medgen sample t1w` and `medgen sample flair-to-t1w`: the reference sampling scripts
//! (`sample_t1w.py`, `sample_flair_to_t1w.py`) with a seed per image and batches.
use crate::amp::Precision;
use crate::data::loader::{read_list, PairRecord};
use crate::data::preprocess::Span;
use crate::device;
use crate::generate::{ModelPaths, Models, Sampler, SamplerChoice, SamplingSection, Text};
use crate::io::png::{load_png, save_grid, save_png, stack_images};
use crate::nets::AutoencoderKL;
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::text::context::PromptContexts;
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::Tensor;

mod volume;
mod volumes_3d;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    task: Task,
    /// Reproducible CUDA runs: deterministic cuDNN, no cuDNN benchmarking, no TF32 (see docs/training.md).
    #[arg(long, global = true)]
    deterministic: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Task {
    /// Unconditional (or text-conditioned) T1w slices from the LDM, one per seed (`sample_t1w.py`).
    T1w(T1wArgs),
    /// T1w slices translated from FLAIR slices by the ControlNet (`sample_flair_to_t1w.py`).
    FlairToT1w(FlairArgs),
    /// Volumes from a 3-D LDM, or translated from control volumes by a 3-D ControlNet, as NIfTI (docs/volumes.md).
    #[command(name = "3d")]
    ThreeD(volumes_3d::Args3d),
}

/// What both tasks load and how they sample.
#[derive(clap::Args, Debug)]
struct Common {
    /// The AutoencoderKL config and weights.
    #[arg(long)]
    stage1_config: PathBuf,
    #[arg(long)]
    stage1_weights: PathBuf,
    /// The LDM config (its `sampling` section gives the scheduler and defaults) and UNet weights.
    #[arg(long)]
    ldm_config: PathBuf,
    #[arg(long)]
    ldm_weights: PathBuf,
    /// Output directory (created).
    #[arg(long)]
    output: PathBuf,
    /// Sampling steps (default: the config's `sampling.num_inference_steps`, else 200 as the reference).
    #[arg(long)]
    steps: Option<usize>,
    /// The sampler (default: the config's `sampling.scheduler_kind`): ddim, ddpm, pndm, dpm-solver++ or unipc,
    /// on the config's training schedule and prediction type.
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    /// The reference scripts' sampling: 200 DDIM steps (clip_sample off, leading spacing), whatever the config's
    /// `sampling` section says. With --precision fp32 (the default) this is the parity setting.
    #[arg(long, conflicts_with_all = ["steps", "scheduler"])]
    reference_sampling: bool,
    /// The networks' precision (default: the config's `sampling.precision`, else fp32, the parity setting; fp32
    /// with --reference-sampling): bf16 (autocast; CPUs with AVX512-BF16/AMX, recent GPUs) or fp16 (autocast; GPUs).
    /// The initial noise, the guidance, the sampler and the decoder stay in float32.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Sample a lone image as a pair with itself (twice the work) so that it equals, bit for bit, its copy from a
    /// batch run on the CPU. Without it a lone image runs at batch 1 and may differ from its batch copy by a PNG level.
    #[arg(long)]
    match_batch: bool,
    /// Classifier-free guidance scale for a text-conditioned UNet (default: the config's, as the
    /// reference: 0 for T1w, 7 for FLAIR->T1w).
    #[arg(long)]
    guidance: Option<f64>,
    /// Prompt contexts from `medgen encode-prompt`, for a text-conditioned UNet.
    #[arg(long)]
    context: Option<PathBuf>,
    /// Latent scale factor (default: recorded in the LDM weights by `medgen train`, else the config's).
    #[arg(long)]
    scale_factor: Option<f64>,
    /// Images sampled together [default: 8; 1 for `sample 3d`, whose images are volumes].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Keep images already in --output (made with the same settings) instead of sampling them again.
    #[arg(long)]
    skip_existing: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args, Debug)]
struct T1wArgs {
    #[command(flatten)]
    common: Common,
    /// Number of images: seeds start-seed .. start-seed + num.
    #[arg(long, default_value_t = 1000)]
    num: usize,
    #[arg(long, default_value_t = 0)]
    start_seed: i64,
    /// Exactly these seeds instead (comma-separated), e.g. to regenerate one image.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<i64>>,
}

#[derive(clap::Args, Debug)]
struct FlairArgs {
    #[command(flatten)]
    common: Common,
    /// The ControlNet config and weights.
    #[arg(long)]
    controlnet_config: PathBuf,
    #[arg(long)]
    controlnet_weights: PathBuf,
    /// A list with `t1w` and `flair` columns (e.g. data/png/test.tsv), or a folder of FLAIR PNGs; or a FLAIR
    /// volume (`.nii`, `.nii.gz`) or a folder of them, translated whole into T1w volumes (docs/volumes.md).
    #[arg(long)]
    input: PathBuf,
    /// At most this many images, from the top of the list [default: 1000, as the reference]. Not for volumes.
    #[arg(long)]
    limit: Option<usize>,
    /// Image i of the list is sampled with seed `seed + i`; for volumes, slice `S0 + i` of each volume.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Volumes: the axial slices `S0:S1` (array axis 2) to translate [default: the range the weights record
    /// from training, else the reference's 166:171].
    #[arg(long)]
    slices: Option<Span>,
    /// Volumes: the in-plane crop `R0:R1,C0:C1` (array axes 0 and 1) the network sees [default: the crop the
    /// weights record from training, else the reference's 16:176,16:240].
    #[arg(long)]
    crop: Option<String>,
    /// Only these rows of the list (0-based, comma-separated), e.g. to regenerate one image.
    #[arg(long, value_delimiter = ',')]
    rows: Option<Vec<usize>>,
    /// ControlNet conditioning scale (default: the config's `sampling.controlnet_scale`, else 1).
    #[arg(long)]
    conditioning_scale: Option<f64>,
}

pub fn run(a: Args) -> Result<()> {
    if a.deterministic {
        device::set_deterministic()?;
    }
    match a.task {
        Task::T1w(t) => t1w(t),
        Task::FlairToT1w(f) => flair_to_t1w(f),
        Task::ThreeD(v) => volumes_3d::run(v),
    }
}

/// The default `--batch-size` of slice sampling.
const SLICE_BATCH: usize = 8;

/// One image to make: its seed, its output name, and for FLAIR->T1w its inputs.
struct Job {
    seed: i64,
    name: String,
    flair: Option<PathBuf>,
    t1w: Option<PathBuf>,
}

struct Setup {
    models: Models,
    text: Text,
    section: SamplingSection,
    /// The config the `sampling` section was read from.
    section_path: PathBuf,
    scheduler_kind: SchedulerKind,
    scheduler: SchedulerConfig,
    sampler_steps: usize,
    precision: Precision,
    device: tch::Device,
}

fn setup(c: &Common, controlnet: Option<(PathBuf, PathBuf)>, default_guidance: f64) -> Result<Setup> {
    let device = device::parse(&c.device)?;
    // The ControlNet config's `sampling` section is the FLAIR->T1w script's; else the LDM's.
    let section_path = controlnet.as_ref().map_or(&c.ldm_config, |(cfg, _)| cfg).clone();
    let section = SamplingSection::of(&section_path)?;
    let paths = ModelPaths {
        stage1: (c.stage1_config.clone(), c.stage1_weights.clone()),
        ldm: (c.ldm_config.clone(), c.ldm_weights.clone()),
        controlnet,
        scale_factor: c.scale_factor,
    };
    let models = Models::load(&paths, device)?;
    let contexts = c.context.as_ref().map(|p| PromptContexts::load(p, device)).transpose()?;
    let text = Text::new(&models.unet.model, contexts, c.guidance, section.guidance_scale.unwrap_or(default_guidance))?;
    let choice = SamplerChoice { kind: c.scheduler, steps: c.steps, reference: c.reference_sampling };
    let (scheduler_kind, scheduler, sampler_steps) = section.resolve(&section_path, &choice)?;
    let precision = match (c.precision, c.reference_sampling) {
        (Some(p), _) => p,
        (None, true) => Precision::Fp32,
        (None, false) => section.precision.unwrap_or_default(),
    };
    ensure!(c.batch_size != Some(0), "--batch-size must be positive");
    Ok(Setup { models, text, section, section_path, scheduler_kind, scheduler, sampler_steps, precision, device })
}

/// The settings that decide the pixels, kept in `manifest.json` so `--skip-existing` never mixes
/// images made differently.
fn settings(c: &Common, s: &Setup, extra: Value) -> Value {
    let guidance = match &s.text {
        Text::None => Value::Null,
        Text::Guided { guidance_scale, .. } => json!(guidance_scale),
    };
    let mut v = json!({
        "stage1_weights": c.stage1_weights, "ldm_weights": c.ldm_weights, "context": c.context,
        "steps": s.sampler_steps, "guidance": guidance, "scale_factor": s.models.scale_factor,
        "scheduler_kind": s.scheduler_kind, "scheduler": s.scheduler, "precision": s.precision,
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

fn check_manifest(out: &Path, settings: &Value, skip_existing: bool) -> Result<()> {
    let path = out.join("manifest.json");
    if skip_existing && path.exists() {
        let old: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        ensure!(
            old.get("settings") == Some(settings),
            "{} was made with other settings ({}); choose another --output or drop --skip-existing",
            out.display(),
            old.get("settings").unwrap_or(&Value::Null)
        );
    }
    Ok(())
}

fn write_manifest(out: &Path, settings: &Value, jobs: &[Job]) -> Result<()> {
    let images: Vec<Value> =
        jobs.iter().map(|j| json!({"seed": j.seed, "image": j.name, "flair": j.flair, "t1w": j.t1w})).collect();
    let text = serde_json::to_string_pretty(&json!({"settings": settings, "images": images}))?;
    let path = out.join("manifest.json");
    crate::io::atomic::write_bytes(&path, text.as_bytes())
}

/// Stores one sampled image of a job, with its FLAIR input if any.
type WriteImage<'a> = &'a dyn Fn(&Job, &Tensor, Option<&Tensor>) -> Result<()>;

/// Samples the jobs in batches; `write` stores each image of a batch.
fn run_jobs(
    s: &Setup,
    jobs: &[Job],
    conditioning_scale: f64,
    latent_shape: [i64; 3],
    c: &Common,
    what: &str,
    write: WriteImage,
) -> Result<()> {
    let sampler = Sampler {
        models: &s.models,
        text: &s.text,
        scheduler_kind: s.scheduler_kind,
        scheduler: s.scheduler.clone(),
        steps: s.sampler_steps,
        conditioning_scale,
        precision: s.precision,
        match_batch: c.match_batch,
        decode_window: None,
        device: s.device,
    };
    let todo: Vec<&Job> = jobs.iter().filter(|j| !(c.skip_existing && c.output.join(&j.name).exists())).collect();
    if todo.len() < jobs.len() {
        eprintln!("{} of {} images already in {}", jobs.len() - todo.len(), jobs.len(), c.output.display());
    }
    let pb = super::progress_bar(todo.len() as u64, what, "images");
    let start = std::time::Instant::now();
    for chunk in todo.chunks(c.batch_size.unwrap_or(SLICE_BATCH)) {
        let seeds: Vec<i64> = chunk.iter().map(|j| j.seed).collect();
        let flair_paths: Option<Vec<&Path>> = chunk.iter().map(|j| j.flair.as_deref()).collect();
        let flair = match flair_paths {
            Some(paths) => {
                let imgs: Vec<Tensor> = paths.iter().map(|p| load_png(p)).collect::<Result<_>>()?;
                Some(stack_images(&imgs, &paths)?)
            }
            None => None,
        };
        let images = sampler.sample(&seeds, &latent_shape, flair.as_ref(), &mut |i, n| {
            pb.set_message(format!("step {i}/{n}"));
        })?;
        let images = images.to_device(tch::Device::Cpu);
        for (k, job) in chunk.iter().enumerate() {
            let f = flair.as_ref().map(|f| f.get(k as i64));
            write(job, &images.get(k as i64), f.as_ref())?;
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_with_message("done");
    if !todo.is_empty() {
        // Sampling and decoding only (not loading), what `make bench` and bench/quality.py read.
        let secs = start.elapsed().as_secs_f64();
        eprintln!("sampled {} images in {secs:.2} s: {:.4} s per image", todo.len(), secs / todo.len() as f64);
    }
    Ok(())
}

fn latent_shape(s: &Setup, h: i64, w: i64) -> Result<[i64; 3]> {
    let want: [i64; 3] = s.models.latent_shape(&[h, w]).try_into().expect("two spatial axes and the channels");
    if let Some(l) = &s.section.latent_shape {
        ensure!(
            l.as_slice() == want,
            "the config's sampling.latent_shape {l:?} does not match {h}x{w} images through this autoencoder ({want:?})"
        );
    }
    Ok(want)
}

/// The config's `sampling.latent_shape`, checked against the autoencoder that decodes it.
fn configured_latent_shape(s: &Setup, l: &[i64]) -> Result<[i64; 3]> {
    let path = s.section_path.display();
    let shape = <[i64; 3]>::try_from(l)
        .map_err(|_| anyhow!("{path}: sampling.latent_shape must be [channels, h, w], got {l:?}"))?;
    ensure!(shape.iter().all(|&n| n > 0), "{path}: sampling.latent_shape must be positive, got {l:?}");
    let channels = s.models.autoencoder.model.config().latent_channels;
    ensure!(
        shape[0] == channels,
        "{path}: sampling.latent_shape {l:?} has {} channels, the autoencoder's latent_channels is {channels}",
        shape[0]
    );
    Ok(shape)
}

/// The slice tasks need a 2-D autoencoder; a 3-D one samples volumes.
fn require_2d(s: &Setup, c: &Common) -> Result<()> {
    let dims = s.models.autoencoder.model.config().spatial_dims;
    ensure!(
        dims == 2,
        "{} is a {dims}-D autoencoder: sample its volumes with `medgen sample 3d` (docs/volumetric.md)",
        c.stage1_config.display()
    );
    Ok(())
}

fn t1w(a: T1wArgs) -> Result<()> {
    let c = &a.common;
    let s = setup(c, None, 0.0)?;
    require_2d(&s, c)?;
    let seeds: Vec<i64> = match &a.seeds {
        Some(v) => v.clone(),
        None => (0..a.num as i64).map(|i| a.start_seed + i).collect(),
    };
    ensure!(!seeds.is_empty(), "no seeds to sample");
    // The reference's 160x224 slices, unless the config says otherwise.
    let shape = match &s.section.latent_shape {
        Some(l) => configured_latent_shape(&s, l)?,
        None => latent_shape(&s, 160, 224)?,
    };
    let jobs: Vec<Job> =
        seeds.iter().map(|&seed| Job { seed, name: format!("sample_{seed}.png"), flair: None, t1w: None }).collect();
    std::fs::create_dir_all(&c.output).with_context(|| format!("cannot create {}", c.output.display()))?;
    let settings = settings(c, &s, json!({"task": "t1w", "latent_shape": shape}));
    check_manifest(&c.output, &settings, c.skip_existing)?;
    write_manifest(&c.output, &settings, &jobs)?;
    run_jobs(&s, &jobs, 1.0, shape, c, "t1w", &|job, img, _| save_png(&c.output.join(&job.name), img))?;
    grid(&c.output, &jobs.iter().take(16).map(|j| vec![c.output.join(&j.name)]).collect::<Vec<_>>(), 8)?;
    eprintln!("{} samples in {}", jobs.len(), c.output.display());
    Ok(())
}

/// The list rows (or folder PNGs) to translate.
fn flair_inputs(input: &Path) -> Result<Vec<PairRecord>> {
    if input.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .with_context(|| format!("cannot read {}", input.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
            .collect();
        files.sort();
        ensure!(!files.is_empty(), "{}: no PNG files", input.display());
        return Ok(files.into_iter().map(|f| PairRecord { t1w: PathBuf::new(), flair: Some(f) }).collect());
    }
    let rows = read_list(input)?;
    ensure!(rows.iter().all(|r| r.flair.is_some()), "{}: FLAIR->T1w needs a `flair` column", input.display());
    Ok(rows)
}

/// The output name of a translated slice: the T1w file's name (as the reference), or for a bare
/// FLAIR file its name with FLAIR replaced by T1w.
fn output_name(r: &PairRecord) -> Result<String> {
    let name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_string);
    if !r.t1w.as_os_str().is_empty() {
        return name(&r.t1w).with_context(|| format!("{}: no file name", r.t1w.display()));
    }
    let f = r.flair.as_ref().expect("checked by flair_inputs");
    let n = name(f).with_context(|| format!("{}: no file name", f.display()))?;
    Ok(if n.contains("FLAIR") { n.replace("FLAIR", "T1w") } else { n.replace(".png", "_T1w.png") })
}

fn flair_to_t1w(a: FlairArgs) -> Result<()> {
    if volume::is_volume_input(&a.input)? {
        return volume::translate(&a);
    }
    ensure!(
        a.slices.is_none() && a.crop.is_none(),
        "--slices and --crop apply to volume inputs (.nii, .nii.gz); {} is a list or a folder of PNGs",
        a.input.display()
    );
    let c = &a.common;
    let s = setup(c, Some((a.controlnet_config.clone(), a.controlnet_weights.clone())), 7.0)?;
    require_2d(&s, c)?;
    let records = flair_inputs(&a.input)?;
    let n = records.len().min(a.limit.unwrap_or(1000));
    let rows: Vec<usize> = match &a.rows {
        Some(r) => {
            for &i in r {
                ensure!(i < n, "row {i} is beyond the {n} rows used from {}", a.input.display());
            }
            r.clone()
        }
        None => (0..n).collect(),
    };
    ensure!(!rows.is_empty(), "{}: nothing to translate", a.input.display());
    let mut jobs = Vec::new();
    for &i in &rows {
        let r = &records[i];
        jobs.push(Job {
            seed: a.seed + i as i64,
            name: output_name(r)?,
            flair: r.flair.clone(),
            t1w: (!r.t1w.as_os_str().is_empty()).then(|| r.t1w.clone()),
        });
    }
    let (h, w) = check_inputs(&jobs, &s.models.autoencoder.model)?;
    let shape = latent_shape(&s, h, w)?;
    let scale = a.conditioning_scale.or(s.section.controlnet_scale).unwrap_or(1.0);
    std::fs::create_dir_all(&c.output).with_context(|| format!("cannot create {}", c.output.display()))?;
    let settings = settings(
        c,
        &s,
        json!({"task": "flair_to_t1w", "controlnet_weights": a.controlnet_weights, "conditioning_scale": scale,
               "input": a.input, "seed": a.seed}),
    );
    check_manifest(&c.output, &settings, c.skip_existing)?;
    write_manifest(&c.output, &settings, &jobs)?;
    let out = &c.output;
    run_jobs(&s, &jobs, scale, shape, c, "flair->t1w", &|job, img, flair| {
        save_png(&out.join(&job.name), img)?;
        // FLAIR | generated T1w | real T1w, from the PNGs as written (what the metrics read).
        let mut row = vec![flair.context("the FLAIR input")?.shallow_clone(), load_png(&out.join(&job.name))?];
        if let Some(t) = &job.t1w {
            row.push(load_png(t)?);
        }
        // The sizes were checked with the inputs; a generated image is the FLAIR's size by construction.
        let cat = Tensor::f_cat(&row, 2)?;
        save_png(&out.join(comparison_name(&job.name)), &cat)
    })?;
    let cmp: Vec<Vec<PathBuf>> = jobs.iter().take(6).map(|j| vec![out.join(comparison_name(&j.name))]).collect();
    grid(out, &cmp, 1)?;
    eprintln!("{} translations in {}", jobs.len(), out.display());
    Ok(())
}

/// Reads every FLAIR input and real T1w of the jobs before anything is written: all of one size (the batches
/// and the comparison images put them side by side), a size the autoencoder reconstructs, 8-bit grayscale.
/// Returns that size.
fn check_inputs(jobs: &[Job], autoencoder: &AutoencoderKL) -> Result<(i64, i64)> {
    use rayon::prelude::*;
    let paths: Vec<&Path> = jobs.iter().flat_map(|j| j.flair.iter().chain(&j.t1w)).map(PathBuf::as_path).collect();
    let sizes: Vec<Vec<i64>> = paths.par_iter().map(|p| Ok(load_png(p)?.size())).collect::<Result<_>>()?;
    let (first, first_size) = (paths.first().context("no FLAIR input")?, &sizes[0]);
    for (p, size) in paths.iter().zip(&sizes) {
        ensure!(
            size == first_size,
            "the inputs must all have one size: {} is {}x{}, {} is {}x{}",
            first.display(),
            first_size[1],
            first_size[2],
            p.display(),
            size[1],
            size[2]
        );
    }
    let (h, w) = (first_size[1], first_size[2]);
    autoencoder.check_reconstructable_size(&[h, w], &first.display().to_string())?;
    Ok((h, w))
}

fn comparison_name(name: &str) -> String {
    format!("{}_comparison.png", name.trim_end_matches(".png"))
}

/// `grid.png`: the given PNGs (all of one size), `cols` per row.
fn grid(out: &Path, cells: &[Vec<PathBuf>], cols: i64) -> Result<()> {
    let paths: Vec<&Path> = cells.iter().flatten().map(PathBuf::as_path).collect();
    let imgs: Vec<Tensor> = paths.iter().map(|p| load_png(p)).collect::<Result<_>>()?;
    if imgs.is_empty() {
        bail!("no images for the grid");
    }
    save_grid(&out.join("grid.png"), &stack_images(&imgs, &paths)?, cols)
}
