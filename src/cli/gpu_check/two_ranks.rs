//! One data-parallel LDM step of a small UNet in two ranks (child processes of this binary, each
//! on half of a batch) against one process on the whole batch, as tests/distributed.rs checks it:
//! the averaged gradients and the stepped weights must match, and the two replicas must agree.
//! On the CPU with Gloo here; with NCCL on cuda:0 and cuda:1 where there are two GPUs.
use super::forward::{relative_error, Net};
use super::{Report, Status};
use crate::amp::Precision;
use crate::distributed;
use crate::schedulers::{NoiseSchedule, SchedulerConfig};
use crate::train::diffusion::{diffusion_loss, diffusion_step};
use crate::train::grad_scaler::GradScaler;
use crate::train::init::build_on_cpu;
use crate::train::optim::{Adam, AdamConfig};
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Cuda, Device, Kind, Tensor};

/// Set in a rank's environment: the folder it writes its gradients and weights to.
pub(super) const WORKER: &str = "MEDGEN_GPU_CHECK_RANK_OUT";

/// The rendezvous, every collective, and each rank's whole run.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The whole batch; each of the two ranks takes half.
const BATCH: i64 = 4;

/// `max |2 ranks - 1 rank| / max |1 rank|` over the gradients and the weights: the CPU's sums
/// differ only in order; CUDA's by algorithm as well (the fp32 bound).
const TOL_CPU: f64 = 1e-5;
const TOL_CUDA: f64 = 1e-4;

/// A rank's side, run by `medgen gpu-check` when [`WORKER`] is set: joins the job the launcher
/// variables describe on its own device, takes one step on its half, writes what it ended with,
/// then leaves the group.
pub(super) fn worker(out: &Path, requested: Device) -> Result<()> {
    let env = distributed::DistEnv::from_env()?.context("a gpu-check rank started without a 2-rank job")?;
    let device = distributed::rank_device(requested, env.local_rank, Cuda::device_count().max(0) as usize)?;
    if device.is_cuda() {
        crate::device::set_deterministic()?;
    }
    let member = distributed::init_from_env(device, TIMEOUT)?.context("the job has one rank")?;
    let half = BATCH / member.world_size() as i64;
    let (grads, weights) = step(device, member.rank() as i64 * half, half)?;
    save(&out.join(format!("rank{}.pt", member.rank())), &grads, &weights)?;
    member.barrier()?;
    member.leave()
}

fn save(path: &Path, grads: &[Tensor], weights: &[Tensor]) -> Result<()> {
    let named: Vec<(String, Tensor)> = grads
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("grad.{i}"), t.shallow_clone()))
        .chain(weights.iter().enumerate().map(|(i, t)| (format!("weight.{i}"), t.shallow_clone())))
        .collect();
    crate::io::atomic::write_with(path, |tmp| {
        Tensor::save_multi(&named, tmp).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

fn load(path: &Path) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let named = Tensor::load_multi(path).with_context(|| format!("cannot read {}", path.display()))?;
    let pick = |prefix: &str| -> Result<Vec<Tensor>> {
        let mut v: Vec<(usize, Tensor)> = Vec::new();
        for (k, t) in &named {
            if let Some(i) = k.strip_prefix(prefix) {
                v.push((i.parse().with_context(|| format!("{}: key {k}", path.display()))?, t.shallow_clone()));
            }
        }
        v.sort_by_key(|(i, _)| *i);
        Ok(v.into_iter().map(|(_, t)| t).collect())
    };
    Ok((pick("grad.")?, pick("weight.")?))
}

/// One LDM step (the trainer's `diffusion_step`, which averages gradients over the group when
/// there is one) of the forward check's UNet, built on the CPU generator, on samples
/// `first..first + n` of a batch drawn on the CPU: the gradients it used and the weights after
/// it, in parameter order, on the CPU.
fn step(device: Device, first: i64, n: i64) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    tch::manual_seed(7);
    let (vs, net) = build_on_cpu(device, |vs| Net::build("DiffusionModelUNet", vs))?;
    let Net::Unet(unet) = net else { bail!("the forward check's UNet is not a UNet") };
    tch::manual_seed(11);
    let latent = Tensor::f_randn([BATCH, 3, 32, 32], (Kind::Float, Device::Cpu))?;
    let noise = Tensor::f_randn([BATCH, 3, 32, 32], (Kind::Float, Device::Cpu))?;
    let t = Tensor::f_from_slice(&[17i64, 503, 250, 999])?;
    let shard = |x: &Tensor| -> Result<Tensor> { Ok(x.f_narrow(0, first, n)?.f_to_device(device)?) };
    let (latent, noise, t) = (shard(&latent)?, shard(&noise)?, shard(&t)?);
    let schedule = NoiseSchedule::from_config(&SchedulerConfig::default())?;
    let prediction = SchedulerConfig::default().prediction_type;
    let mut opt = Adam::from_var_store(AdamConfig::adamw(1e-3), &vs)?;
    let mut scaler = GradScaler::for_precision(Precision::Fp32)?;
    let _loss = diffusion_step(&mut opt, &mut scaler, Precision::Fp32, device, || {
        diffusion_loss(&unet, None, &schedule, prediction, &latent, &noise, &t, None)
    })?;
    let cpu = |ts: Vec<Tensor>| -> Result<Vec<Tensor>> {
        Ok(ts.iter().map(|x| x.f_to_device(Device::Cpu)).collect::<Result<_, _>>()?)
    };
    Ok((cpu(opt.grads()?)?, cpu(opt.trainable_params())?))
}

/// The CPU half (Gloo) always; the NCCL one with two GPUs.
pub(super) fn run(report: &mut Report, cuda: Option<Device>, n_gpus: i64, work: &Path) {
    report.check("2-rank step (gloo) = 1 rank on the concatenated batch", "cpu", || {
        compare(Device::Cpu, &work.join("two-ranks-cpu"), TOL_CPU)
    });
    let name = "2-rank step (NCCL) = 1 rank on the concatenated batch";
    match cuda {
        None => report.skip(name, "2 x cuda", "no CUDA"),
        Some(_) if n_gpus < 2 => report.skip(name, "2 x cuda", &format!("{n_gpus} GPU(s): needs 2")),
        Some(_) if !distributed::nccl_compiled() => {
            report.skip(name, "2 x cuda", "this build has no NCCL process group")
        }
        Some(_) => {
            report.check(name, "cuda:0 + cuda:1", || compare(Device::Cuda(0), &work.join("two-ranks-cuda"), TOL_CUDA))
        }
    }
}

/// Two ranks (`device` cpu: Gloo on the CPU; cuda: cuda:0 and cuda:1) against this process on
/// `device` with the whole batch.
fn compare(device: Device, dir: &Path, tol: f64) -> Result<(String, Status)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let exe = std::env::current_exe().context("cannot find this executable to start the ranks")?;
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .context("no free loopback port")?
        .port()
        .to_string();
    let requested = if device.is_cuda() { "cuda" } else { "cpu" };
    let mut children = Vec::new();
    for rank in 0..2 {
        let log = std::fs::File::create(dir.join(format!("rank{rank}.log")))
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        let child = Command::new(&exe)
            .args(["gpu-check", "--device", requested])
            .env(WORKER, dir)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            // Buckets of ~10 KB: several, each all-reduced while the backward pass goes on.
            .env("MEDGEN_BUCKET_CAP_MB", "0.01")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push(child);
    }
    let t0 = Instant::now();
    let mut failed = Vec::new();
    for (rank, mut c) in children.into_iter().enumerate() {
        let status = loop {
            if let Some(s) = c.try_wait()? {
                break Some(s);
            }
            if t0.elapsed() > TIMEOUT {
                let _ = c.kill();
                let _ = c.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(dir.join(format!("rank{rank}.log"))).unwrap_or_default();
        match status {
            Some(s) if s.success() && log.contains(&format!("rank {rank} of 2 left")) => {}
            Some(s) => failed.push(format!("rank {rank} ({s}): {}", tail(&log))),
            None => failed.push(format!("rank {rank} still running after {TIMEOUT:?}: {}", tail(&log))),
        }
    }
    ensure!(failed.is_empty(), "{}", failed.join("; "));

    let (g0, w0) = load(&dir.join("rank0.pt"))?;
    let (g1, w1) = load(&dir.join("rank1.pt"))?;
    let (g, w) = step(device, 0, BATCH)?;
    ensure!(
        [g0.len(), g1.len()] == [g.len(); 2] && [w0.len(), w1.len()] == [w.len(); 2],
        "the ranks saved {}/{} gradients and {}/{} weights, one process has {} and {}",
        g0.len(),
        g1.len(),
        w0.len(),
        w1.len(),
        g.len(),
        w.len()
    );
    for (i, (a, b)) in g0.iter().zip(&g1).chain(w0.iter().zip(&w1)).enumerate() {
        ensure!(a.f_equal(b)?, "tensor {i} differs between the two replicas");
    }
    let mut largest = 0f64;
    for x in &g {
        largest = largest.max(x.f_abs()?.f_max()?.f_double_value(&[])?);
    }
    // Equal zeros everywhere would pass the comparison without checking the averaging.
    ensure!(largest > 0.0, "every gradient of the one-process step is zero");
    let (eg, ew) = (relative_error(&g, &g0)?, relative_error(&w, &w0)?);
    let result = format!("{} gradients: rel. error {eg:.1e}; weights after the step: {ew:.1e}", g.len());
    Ok((result, if eg <= tol && ew <= tol { Status::Pass } else { Status::Fail(format!("above {tol:.0e}")) }))
}

/// The last lines of a rank's log, for the row.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}
