//! `medgen sample flair-to-t1w` on whole NIfTI volumes (docs/volumes.md): each FLAIR volume is
//! cropped and scaled exactly as `medgen preprocess` makes the training PNGs, its axial slices are
//! translated in seeded batches, and the T1w slices are pasted back into a float32 volume with the
//! input's geometry, zero outside the translated slices and the crop.
//!
//! The network input of slice `S0 + i` is bit for bit the PNG path's input for the preprocessed
//! `…_slice-{i}_FLAIR.png`, and it is sampled with the seed and batch the PNG path gives row `i` of
//! a list of those PNGs in order: seed `--seed + i`, batches of `--batch-size` consecutive slices
//! from `S0`. Each volume starts again at `--seed`, so a volume's output does not depend on the
//! other volumes of a folder.
use super::{latent_shape, setup, FlairArgs, Setup};
use crate::data::preprocess::{normalize_slab, Crop, Span};
use crate::generate::Sampler;
use crate::io::volume::{is_volume_name, write_volume, SliceReader};
use crate::train::stages::{META_CROP, META_SLICES};
use anyhow::{anyhow, bail, ensure, Context, Result};
use ndarray::{s, Array3};
use nifti::NiftiHeader;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The volumes directly in `dir`, sorted; hidden files (a killed writer's `.tmp-…`) are not volumes.
fn volume_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry.with_context(|| format!("cannot read {}", dir.display()))?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if !hidden && path.is_file() && is_volume_name(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Whether `--input` names volumes: a `.nii`/`.nii.gz` path, or a folder holding such files (and no PNG,
/// which would leave it unclear what to translate).
pub fn is_volume_input(input: &Path) -> Result<bool> {
    if !input.is_dir() {
        return Ok(is_volume_name(input));
    }
    let volumes = volume_files(input)?;
    if volumes.is_empty() {
        return Ok(false);
    }
    let png = std::fs::read_dir(input)
        .with_context(|| format!("cannot read {}", input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")));
    if let Some(png) = png {
        bail!(
            "{} holds both NIfTI volumes ({}) and PNGs ({}): put the volumes or the PNGs in a folder of their own",
            input.display(),
            volumes[0].display(),
            png.display()
        );
    }
    Ok(true)
}

/// One volume to translate and where its output goes.
struct Pair {
    input: PathBuf,
    output: PathBuf,
}

/// The volumes of `--input` and their outputs: a file gives the file `--output`; a folder gives
/// `--output/<the input's file name>` for each volume directly in it.
fn pairs(input: &Path, output: &Path) -> Result<Vec<Pair>> {
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !input.is_dir() {
        ensure!(
            is_volume_name(output),
            "--output {}: a volume input is written to a .nii or .nii.gz file",
            output.display()
        );
        ensure!(!same(input, output), "--output {} is the input volume: choose another name", output.display());
        return Ok(vec![Pair { input: input.to_path_buf(), output: output.to_path_buf() }]);
    }
    ensure!(
        !output.is_file(),
        "--output {} is a file: the translations of a folder of volumes go to a folder",
        output.display()
    );
    ensure!(
        !same(input, output),
        "--output {} is the input folder: the translations keep the inputs' names, choose another folder",
        output.display()
    );
    let files = volume_files(input)?;
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let name = f.file_name().context("a volume without a file name")?;
        out.push(Pair { output: output.join(name), input: f });
    }
    Ok(out)
}

/// A FLAIR volume ready for the network: its header, its shape, and its crop scaled to u8 as the
/// training PNGs were.
struct Prepared {
    header: NiftiHeader,
    dims: [usize; 3],
    /// `[rows, cols, slices]` of the crop.
    flair: Array3<u8>,
}

/// Reads the crop's slices of `path` and scales them as `medgen preprocess` does; every problem
/// (not NIfTI, corrupt, not 3-D, too small for the crop, non-finite or constant) names the file.
fn prepare(path: &Path, crop: &Crop) -> Result<Prepared> {
    let read = || -> Result<Prepared> {
        let reader = SliceReader::open(path)?;
        let dims = reader.dims();
        ensure!(
            crop.fits(dims),
            "{}: a volume of shape {dims:?} is smaller than the crop {crop} (rows, cols, slices; needs at least \
             {:?})",
            path.display(),
            crop.min_shape()
        );
        let header = reader.header.clone();
        let slab = reader.read_slices(crop.slices.start, crop.slices.end)?;
        let flair = normalize_slab(slab.view(), crop).map_err(|(_, reason)| anyhow!("{}: {reason}", path.display()))?;
        Ok(Prepared { header, dims, flair })
    };
    crate::panics::catch(read).map_err(|msg| anyhow!("{}: cannot decode the volume: {msg}", path.display()))?
}

/// The crop the weights record from training (`medgen train` writes it when its data directory
/// came from `medgen preprocess`): the ControlNet's, else the LDM's, else the autoencoder's.
fn recorded_crop(a: &FlairArgs, s: &Setup) -> Result<Option<(Crop, PathBuf)>> {
    let c = &a.common;
    let models = &s.models;
    let mut sources = vec![(&models.unet.state_dict.metadata, &c.ldm_weights)];
    if let Some(cn) = &models.controlnet {
        sources.insert(0, (&cn.state_dict.metadata, &a.controlnet_weights));
    }
    sources.push((&models.autoencoder.state_dict.metadata, &c.stage1_weights));
    for (meta, path) in sources {
        let (Some(in_plane), Some(slices)) = (meta.get(META_CROP), meta.get(META_SLICES)) else { continue };
        let crop = slices
            .parse::<Span>()
            .and_then(|sl| Crop::parse(in_plane, sl))
            .with_context(|| format!("{}: bad {META_CROP} {in_plane:?} / {META_SLICES} {slices:?}", path.display()))?;
        return Ok(Some((crop, path.clone())));
    }
    Ok(None)
}

/// `--crop`/`--slices`, else the recorded crop, else the reference's (said on stderr).
fn resolve_crop(a: &FlairArgs, s: &Setup) -> Result<Crop> {
    let recorded = recorded_crop(a, s)?;
    let base = match &recorded {
        Some((crop, _)) => *crop,
        None => {
            if a.crop.is_none() || a.slices.is_none() {
                eprintln!(
                    "note: the weights record no training crop (a ported checkpoint or a run older than this \
                     record): using the reference's {} where --crop/--slices do not say",
                    Crop::REFERENCE
                );
            }
            Crop::REFERENCE
        }
    };
    let slices = a.slices.unwrap_or(base.slices);
    match &a.crop {
        Some(in_plane) => Crop::parse(in_plane, slices).with_context(|| format!("--crop {in_plane:?}")),
        None => Ok(Crop { slices, ..base }),
    }
}

/// Translates the volumes of `--input` (docs/volumes.md).
pub fn translate(a: &FlairArgs) -> Result<()> {
    let c = &a.common;
    ensure!(a.rows.is_none() && a.limit.is_none(), "--rows and --limit apply to lists of PNGs, not to volumes");
    ensure!(!c.skip_existing, "--skip-existing applies to PNG outputs, not to volumes");
    let pairs = pairs(&a.input, &c.output)?;
    ensure!(!pairs.is_empty(), "{}: no .nii or .nii.gz files", a.input.display());
    let s = setup(c, Some((a.controlnet_config.clone(), a.controlnet_weights.clone())), 7.0)?;
    super::require_2d(&s, c)?;
    let crop = resolve_crop(a, &s)?;
    let (h, w) = (crop.rows.len() as i64, crop.cols.len() as i64);
    s.models.autoencoder.model.check_reconstructable_size(&[h, w], &format!("the crop {crop}"))?;
    let shape = latent_shape(&s, h, w)?;
    // Every volume is checked before the first is sampled: a bad one is reported at once, not hours later.
    let mut good = Vec::new();
    let mut failed = Vec::new();
    for p in pairs {
        match prepare(&p.input, &crop) {
            Ok(_) => good.push(p),
            Err(e) => failed.push((p.input, e)),
        }
    }
    let folder = a.input.is_dir();
    if !folder {
        if let Some((_, e)) = failed.pop() {
            return Err(e);
        }
    }
    for (path, e) in &failed {
        eprintln!("skipped {}: {e:#}", path.display());
    }
    ensure!(
        !good.is_empty(),
        "none of the {} volumes in {} can be translated (see the `skipped` lines above)",
        failed.len(),
        a.input.display()
    );
    if folder {
        std::fs::create_dir_all(&c.output).with_context(|| format!("cannot create {}", c.output.display()))?;
    }
    let scale = a.conditioning_scale.or(s.section.controlnet_scale).unwrap_or(1.0);
    let sampler = Sampler {
        models: &s.models,
        text: &s.text,
        scheduler_kind: s.scheduler_kind,
        scheduler: s.scheduler.clone(),
        steps: s.sampler_steps,
        conditioning_scale: scale,
        precision: s.precision,
        match_batch: c.match_batch,
        decode_window: None,
        device: s.device,
    };
    let n_slices = crop.slices.len();
    let pb = super::super::progress_bar((good.len() * n_slices) as u64, "flair->t1w", "slices");
    let start = std::time::Instant::now();
    for p in &good {
        let prepared = prepare(&p.input, &crop)?;
        let name = p.input.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let t1w = translate_volume(
            &sampler,
            &prepared,
            &crop,
            a.seed,
            c.batch_size.unwrap_or(super::SLICE_BATCH),
            shape,
            &|done, msg| {
                if done > 0 {
                    pb.inc(done as u64);
                }
                pb.set_message(format!("{name} {msg}"));
            },
        )?;
        write_volume(&p.output, &t1w, Some(&output_header(&prepared.header, &p.input)))?;
    }
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let total = good.len() * n_slices;
    eprintln!(
        "translated {total} slices ({crop}) of {} volume(s) in {secs:.2} s: {:.4} s per slice; output in {}",
        good.len(),
        secs / total as f64,
        c.output.display()
    );
    if !failed.is_empty() {
        bail!(
            "{} of {} volumes in {} could not be translated (see the `skipped` lines above); the other {} are in {}",
            failed.len(),
            failed.len() + good.len(),
            a.input.display(),
            good.len(),
            c.output.display()
        );
    }
    Ok(())
}

/// The input's header for the float32 output in [0, 1]: geometry, units and codes kept; the writer
/// sets the datatype and `scl_slope` 1 / `scl_inter` 0. The display window is the output's range, and
/// the description says the volume is synthetic.
fn output_header(input: &NiftiHeader, path: &Path) -> NiftiHeader {
    let mut h = input.clone();
    h.cal_min = 0.0;
    h.cal_max = 1.0;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let mut descrip = format!("medgen flair-to-t1w of {name}").into_bytes();
    descrip.truncate(79);
    descrip.resize(80, 0);
    h.descrip = descrip;
    h
}

/// The T1w volume of one prepared FLAIR volume: float32 of its shape, the translated slices pasted at
/// the crop, zero elsewhere. `progress(slices_done, message)` is called per step and per batch.
fn translate_volume(
    sampler: &Sampler,
    v: &Prepared,
    crop: &Crop,
    seed: i64,
    batch_size: usize,
    latent_shape: [i64; 3],
    progress: &dyn Fn(usize, String),
) -> Result<Array3<f32>> {
    let (h, w, n) = (crop.rows.len(), crop.cols.len(), crop.slices.len());
    let mut out = Array3::<f32>::zeros(v.dims);
    for first in (0..n).step_by(batch_size) {
        let batch: Vec<usize> = (first..(first + batch_size).min(n)).collect();
        let seeds: Vec<i64> = batch.iter().map(|&i| seed + i as i64).collect();
        // `load_png`'s arithmetic on the pixels the PNG would hold: u8 / 255 in float32.
        let pixels: Vec<f32> = batch
            .iter()
            .flat_map(|&i| v.flair.slice(s![.., .., i]).iter().map(|&p| p as f32 / 255.0).collect::<Vec<_>>())
            .collect();
        let control = Tensor::f_from_slice(&pixels)?.f_view([batch.len() as i64, 1, h as i64, w as i64])?;
        let images = sampler.sample(&seeds, &latent_shape, Some(&control), &mut |i, steps| {
            progress(0, format!("step {i}/{steps}"));
        })?;
        // `save_png`'s clip to [0, 1], without its quantisation to 8 bits.
        let images = images.f_to_device(Device::Cpu)?.f_clamp(0.0, 1.0)?;
        let values = Vec::<f32>::try_from(images.f_flatten(0, -1)?)?;
        ensure!(
            values.len() == batch.len() * h * w,
            "the decoder returned {} values for {} slices of {h}x{w}",
            values.len(),
            batch.len()
        );
        for (b, &i) in batch.iter().enumerate() {
            let image = &values[b * h * w..(b + 1) * h * w];
            let mut target = out.slice_mut(s![
                crop.rows.start..crop.rows.end,
                crop.cols.start..crop.cols.end,
                crop.slices.start + i
            ]);
            for ((r, col), t) in target.indexed_iter_mut() {
                *t = image[r * w + col];
            }
        }
        progress(batch.len(), format!("slices {}..{} of {n}", first, first + batch.len()));
    }
    Ok(out)
}
