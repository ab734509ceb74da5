//! `medgen sample 3d`: volumes from a 3-D latent diffusion model (a ported model-zoo bundle, or `medgen train`
//! on NIfTI volumes), unconditional or translated by a 3-D ControlNet from control volumes, written as float32
//! NIfTI in [0, 1] (docs/volumes.md).
//!
//! The header: a control volume's (geometry, units and codes kept, as FLAIR->T1w keeps its input's), else one made
//! from the voxel size (`--voxel-size`, else the config's `sampling.voxel_size`, else 1 mm) with an axis-aligned
//! scanner affine. The decoder runs on the whole latent, or by MONAI's sliding window over it (`--sw-roi`), which
//! bounds its activations by the window (docs/volumes.md gives the measured peak memory).
use super::{check_manifest, settings, setup, write_manifest, Common, Setup};
use crate::data::volumes::{normalize, to_tensor};
use crate::generate::Sampler;
use crate::io::png::stack_images;
use crate::io::volume::{is_volume_name, read_volume, write_volume, SliceReader};
use crate::sliding_window::{BlendMode, SlidingWindowConfig};
use anyhow::{bail, ensure, Context, Result};
use ndarray::Array3;
use nifti::NiftiHeader;
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

#[derive(clap::Args, Debug)]
pub(super) struct Args3d {
    #[command(flatten)]
    common: Common,
    /// Number of volumes: seeds start-seed .. start-seed + num (without --control).
    #[arg(long, default_value_t = 1)]
    num: usize,
    #[arg(long, default_value_t = 0)]
    start_seed: i64,
    /// The latent to sample, `channels,X,Y,Z` [default: the config's `sampling.latent_shape`; with --control, the
    /// control volume's shape through the autoencoder].
    #[arg(long, value_delimiter = ',')]
    latent_shape: Option<Vec<i64>>,
    /// Voxel size in mm, `x,y,z`, for the output header without --control [default: the config's
    /// `sampling.voxel_size`, else 1,1,1].
    #[arg(long, value_delimiter = ',')]
    voxel_size: Option<Vec<f64>>,
    /// A 3-D ControlNet's config and weights, with --control.
    #[arg(long, requires = "control")]
    controlnet_config: Option<PathBuf>,
    #[arg(long, requires = "control")]
    controlnet_weights: Option<PathBuf>,
    /// The control: a NIfTI volume or a folder of them, each intensity-scaled as the training volumes
    /// (`data::volumes`) and sampled with seed `--start-seed + i`; its output keeps its name and header.
    #[arg(long, requires_all = ["controlnet_config", "controlnet_weights"])]
    control: Option<PathBuf>,
    /// ControlNet conditioning scale (default: the config's `sampling.controlnet_scale`, else 1).
    #[arg(long)]
    conditioning_scale: Option<f64>,
    /// Decode by a sliding window of this many latent voxels, `X,Y,Z` (a non-positive entry: the whole axis),
    /// as MONAI's `SlidingWindowInferer(roi_size)`; without it the whole latent is decoded at once.
    #[arg(long, value_delimiter = ',')]
    sw_roi: Option<Vec<i64>>,
    /// Fraction of a window shared with its neighbour (MONAI's `overlap`).
    #[arg(long, default_value_t = 0.25, requires = "sw_roi")]
    sw_overlap: f64,
    /// How overlapping windows are blended: constant or gaussian (MONAI's `mode`).
    #[arg(long, value_enum, default_value = "constant", requires = "sw_roi")]
    sw_mode: SwMode,
    /// The Gaussian's sigma as a fraction of the window (MONAI's `sigma_scale`).
    #[arg(long, default_value_t = 0.125, requires = "sw_roi")]
    sw_sigma_scale: f64,
    /// Windows decoded together (MONAI's `sw_batch_size`).
    #[arg(long, default_value_t = 1, requires = "sw_roi")]
    sw_batch_size: i64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum SwMode {
    Constant,
    Gaussian,
}

/// One volume to make.
struct Job {
    seed: i64,
    output: PathBuf,
    control: Option<PathBuf>,
}

/// The control volumes of `--control` (a file, or the volumes directly in a folder, sorted).
fn control_files(control: &Path) -> Result<Vec<PathBuf>> {
    if !control.is_dir() {
        ensure!(is_volume_name(control), "--control {}: not a .nii or .nii.gz file", control.display());
        return Ok(vec![control.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(control)
        .with_context(|| format!("cannot read {}", control.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_volume_name(p))
        .filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "--control {}: no .nii or .nii.gz files", control.display());
    Ok(files)
}

fn window(a: &Args3d) -> Option<SlidingWindowConfig> {
    a.sw_roi.as_ref().map(|roi| SlidingWindowConfig {
        sw_batch_size: a.sw_batch_size,
        overlap: vec![a.sw_overlap],
        mode: match a.sw_mode {
            SwMode::Constant => BlendMode::Constant,
            SwMode::Gaussian => BlendMode::Gaussian,
        },
        sigma_scale: vec![a.sw_sigma_scale],
        ..SlidingWindowConfig::new(roi.clone())
    })
}

/// A header for a generated volume without a control: `voxel` mm voxels, the sform (and qform) an axis-aligned
/// scanner affine with the volume's corner at the origin, millimetres, float32 in [0, 1].
fn made_header(voxel: [f64; 3]) -> NiftiHeader {
    let [x, y, z] = voxel.map(|v| v as f32);
    NiftiHeader {
        pixdim: [1.0, x, y, z, 0.0, 0.0, 0.0, 0.0],
        xyzt_units: 2, // millimetres
        qform_code: 1,
        sform_code: 1,
        quatern_b: 0.0,
        quatern_c: 0.0,
        quatern_d: 0.0,
        srow_x: [x, 0.0, 0.0, 0.0],
        srow_y: [0.0, y, 0.0, 0.0],
        srow_z: [0.0, 0.0, z, 0.0],
        cal_min: 0.0,
        cal_max: 1.0,
        ..NiftiHeader::default()
    }
}

/// A control volume's header for its output: its geometry kept, the display window the output's range.
fn control_header(input: &NiftiHeader) -> NiftiHeader {
    let mut h = input.clone();
    h.cal_min = 0.0;
    h.cal_max = 1.0;
    h
}

/// A decoded `(1, X, Y, Z)` volume (on the CPU), clipped to [0, 1], as an array.
fn to_array(image: &Tensor) -> Result<Array3<f32>> {
    let s = image.size();
    ensure!(s.len() == 4 && s[0] == 1, "the decoder returned shape {s:?} for one volume");
    let values = Vec::<f32>::try_from(image.f_clamp(0.0, 1.0)?.f_flatten(0, -1)?)?;
    Array3::from_shape_vec((s[1] as usize, s[2] as usize, s[3] as usize), values).context("the decoded volume")
}

pub(super) fn run(a: Args3d) -> Result<()> {
    let c = &a.common;
    let controlnet = a.controlnet_config.clone().zip(a.controlnet_weights.clone());
    let s = setup(c, controlnet, 0.0)?;
    let ae = &s.models.autoencoder.model;
    ensure!(
        ae.config().spatial_dims == 3,
        "{} is a {}-D autoencoder: `sample 3d` is for 3-D models (`sample t1w` / `flair-to-t1w` sample slices)",
        c.stage1_config.display(),
        ae.config().spatial_dims
    );
    let window = window(&a);
    if let Some(w) = &window {
        w.validate(3)?;
    }
    // The jobs, and the controls checked before anything is sampled: a bad one is reported at once.
    let jobs: Vec<Job> = match &a.control {
        Some(control) => {
            ensure!(a.latent_shape.is_none(), "--latent-shape: with --control the latent follows the control volume");
            ensure!(a.voxel_size.is_none(), "--voxel-size: with --control the output keeps the control's header");
            control_files(control)?
                .into_iter()
                .enumerate()
                .map(|(i, f)| {
                    let name = f.file_name().context("a control without a file name")?;
                    Ok(Job { seed: a.start_seed + i as i64, output: c.output.join(name), control: Some(f) })
                })
                .collect::<Result<_>>()?
        }
        None => (0..a.num as i64)
            .map(|i| {
                let seed = a.start_seed + i;
                Job { seed, output: c.output.join(format!("sample_{seed}.nii.gz")), control: None }
            })
            .collect(),
    };
    ensure!(!jobs.is_empty(), "--num 0: no volumes to sample");
    if let Some(control) = &a.control {
        let dir = if control.is_dir() { control.as_path() } else { control.parent().unwrap_or(Path::new(".")) };
        let same = matches!((dir.canonicalize(), c.output.canonicalize()), (Ok(x), Ok(y)) if x == y);
        ensure!(
            !same,
            "--output {} holds the control volumes, whose names the outputs take: choose another folder",
            c.output.display()
        );
    }
    for path in jobs.iter().filter_map(|j| j.control.as_ref()) {
        let dims: Vec<i64> = SliceReader::open(path)?.dims().iter().map(|&d| d as i64).collect();
        ae.check_reconstructable_size(&dims, &path.display().to_string())?;
    }
    let configured = a.latent_shape.clone().or(s.section.latent_shape.clone());
    let fixed_shape = match (&a.control, configured) {
        (Some(_), _) => None,
        (None, Some(l)) => Some(checked_latent_shape(&s, &l)?),
        (None, None) => bail!(
            "no latent shape: give --latent-shape channels,X,Y,Z or `sampling.latent_shape` in {}",
            s.section_path.display()
        ),
    };
    let voxel = match a.voxel_size.clone().or(s.section.voxel_size.clone()) {
        None => [1.0; 3],
        Some(v) => {
            let v: [f64; 3] = v.try_into().map_err(|v| anyhow::anyhow!("the voxel size must be x,y,z, got {v:?}"))?;
            ensure!(v.iter().all(|&x| x > 0.0 && x.is_finite()), "the voxel size must be positive, got {v:?}");
            v
        }
    };
    let scale = a.conditioning_scale.or(s.section.controlnet_scale).unwrap_or(1.0);
    std::fs::create_dir_all(&c.output).with_context(|| format!("cannot create {}", c.output.display()))?;
    let settings = settings(
        c,
        &s,
        json!({"task": "3d", "latent_shape": fixed_shape, "controlnet_weights": a.controlnet_weights,
               "conditioning_scale": scale, "control": a.control, "voxel_size": voxel,
               "sliding_window": window}),
    );
    check_manifest(&c.output, &settings, c.skip_existing)?;
    let manifest_jobs: Vec<super::Job> = jobs
        .iter()
        .map(|j| super::Job {
            seed: j.seed,
            name: j.output.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
            flair: j.control.clone(),
            t1w: None,
        })
        .collect();
    write_manifest(&c.output, &settings, &manifest_jobs)?;
    let sampler = Sampler {
        models: &s.models,
        text: &s.text,
        scheduler_kind: s.scheduler_kind,
        scheduler: s.scheduler.clone(),
        steps: s.sampler_steps,
        conditioning_scale: scale,
        precision: s.precision,
        match_batch: c.match_batch,
        decode_window: window.as_ref(),
        device: s.device,
    };
    let todo: Vec<&Job> = jobs.iter().filter(|j| !(c.skip_existing && j.output.exists())).collect();
    if todo.len() < jobs.len() {
        eprintln!("{} of {} volumes already in {}", jobs.len() - todo.len(), jobs.len(), c.output.display());
    }
    let pb = super::super::progress_bar(todo.len() as u64, "3d", "volumes");
    let start = std::time::Instant::now();
    for chunk in todo.chunks(c.batch_size.unwrap_or(1)) {
        let seeds: Vec<i64> = chunk.iter().map(|j| j.seed).collect();
        let (control, headers, shape) = match fixed_shape.clone() {
            Some(shape) => (None, vec![made_header(voxel); chunk.len()], shape),
            None => {
                let (control, headers) = load_controls(&s, chunk)?;
                let shape = s.models.latent_shape(&control.size()[2..]);
                (Some(control), headers, shape)
            }
        };
        let images = sampler.sample(&seeds, &shape, control.as_ref(), &mut |i, n| {
            pb.set_message(format!("step {i}/{n}"));
        })?;
        let images = images.f_to_device(Device::Cpu)?;
        for (k, (job, header)) in chunk.iter().zip(&headers).enumerate() {
            write_volume(&job.output, &to_array(&images.get(k as i64))?, Some(header))?;
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    if !todo.is_empty() {
        let secs = start.elapsed().as_secs_f64();
        eprintln!("sampled {} volumes in {secs:.2} s: {:.3} s per volume", todo.len(), secs / todo.len() as f64);
    }
    eprintln!("{} volumes in {}", jobs.len(), c.output.display());
    Ok(())
}

/// `[channels, X, Y, Z]`, positive, with the autoencoder's latent channels.
fn checked_latent_shape(s: &Setup, l: &[i64]) -> Result<Vec<i64>> {
    ensure!(l.len() == 4, "the latent shape must be channels,X,Y,Z, got {l:?}");
    ensure!(l.iter().all(|&n| n > 0), "the latent shape must be positive, got {l:?}");
    let channels = s.models.autoencoder.model.config().latent_channels;
    ensure!(
        l[0] == channels,
        "the latent shape {l:?} has {} channels, the autoencoder's latent_channels is {channels}",
        l[0]
    );
    Ok(l.to_vec())
}

/// The control volumes of a batch, normalised, stacked `(B, 1, X, Y, Z)`, with their output headers: one shape,
/// one the autoencoder reconstructs; every problem names the file.
fn load_controls(s: &Setup, chunk: &[&Job]) -> Result<(Tensor, Vec<NiftiHeader>)> {
    let mut volumes = Vec::with_capacity(chunk.len());
    let mut headers = Vec::with_capacity(chunk.len());
    for job in chunk {
        let path = job.control.as_ref().context("a ControlNet job without its control")?;
        let v = read_volume(path)?;
        let what = path.display().to_string();
        let dims: Vec<i64> = v.dims().iter().map(|&d| d as i64).collect();
        s.models.autoencoder.model.check_reconstructable_size(&dims, &what)?;
        volumes.push(to_tensor(&normalize(&v.data, &what)?)?);
        headers.push(control_header(&v.header));
    }
    let paths: Vec<&Path> = chunk.iter().filter_map(|j| j.control.as_deref()).collect();
    Ok((stack_images(&volumes, &paths)?, headers))
}
