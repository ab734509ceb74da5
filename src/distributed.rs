//! Synchronous data parallelism on PyTorch's own collective engine, c10d (src/shim/dist.cpp):
//! a TCPStore rendezvous served by rank 0 at `MASTER_ADDR:MASTER_PORT`, then a Gloo process group
//! (CPU; CUDA tensors staged through the host) or NCCL (GPUs, where the build found its headers).
//! Every process holds a replica, trains on its shard of the data, and averages gradients with the
//! others before each optimiser step, as `torch.nn.parallel.DistributedDataParallel` does.
//!
//! The job is described the way PyTorch jobs are launched: torchrun's variables (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or those of `mpirun` (Open MPI's
//! `OMPI_COMM_WORLD_*`) or Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) with
//! `MASTER_ADDR`/`MASTER_PORT` set by the job script. `medgen launch --nproc N` starts N local ones.
//!
//! The group is process-wide (as `torch.distributed`'s default group): [`init`] once, then the
//! training loops ask [`rank`], [`world_size`] and call [`average_gradients`], which do nothing in
//! a single process.
use anyhow::{bail, ensure, Context, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

extern "C" {
    fn medgen_dist_backends() -> i32;
    fn medgen_dist_new(
        backend: *const c_char,
        master_addr: *const c_char,
        master_port: i32,
        rank: i32,
        world_size: i32,
        timeout_s: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn medgen_dist_free(g: *mut c_void);
    fn medgen_dist_all_reduce_sum(g: *mut c_void, ts: *mut *mut c_void, n: i32, err: *mut c_char, len: usize) -> i32;
    fn medgen_dist_broadcast(
        g: *mut c_void,
        ts: *mut *mut c_void,
        n: i32,
        root: i32,
        err: *mut c_char,
        len: usize,
    ) -> i32;
    fn medgen_dist_barrier(g: *mut c_void, err: *mut c_char, len: usize) -> i32;
}

/// DDP's default bucket size: gradients are all-reduced in flat buffers of about this many bytes.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Where this process stands in the job, read from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse<T: std::str::FromStr>(name: &str, v: String) -> Result<T> {
    v.trim().parse().map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid number"))
}

impl DistEnv {
    /// The job this process belongs to, or `None` for a lone process (no launcher variables, or a
    /// world of one).
    pub fn from_env() -> Result<Option<Self>> {
        let launchers = [
            ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ];
        let Some((r, w, l)) = launchers.into_iter().find(|(r, w, _)| var(r).is_some() && var(w).is_some()) else {
            return Ok(None);
        };
        let world_size: usize = parse(w, var(w).expect("checked"))?;
        let rank: usize = parse(r, var(r).expect("checked"))?;
        ensure!(world_size >= 1 && rank < world_size, "{r}={rank} is not below {w}={world_size}");
        if world_size == 1 {
            return Ok(None);
        }
        let local_rank = match var(l) {
            Some(v) => parse(l, v)?,
            None => rank,
        };
        let master_addr = var("MASTER_ADDR").with_context(|| {
            format!("{w}={world_size} but MASTER_ADDR is not set: the address of rank 0's host (torchrun sets it)")
        })?;
        let master_port = parse("MASTER_PORT", var("MASTER_PORT").with_context(|| {
            format!("{w}={world_size} but MASTER_PORT is not set: a free port on rank 0's host (torchrun sets it)")
        })?)?;
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port }))
    }
}

/// The collective engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// NCCL for CUDA where this build has it, Gloo otherwise (as torch.distributed's defaults).
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() && unsafe { medgen_dist_backends() } & 2 != 0 {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// A joined process group.
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    world_size: usize,
    backend: Backend,
    /// Where this rank's small collectives (loss sums) live: its GPU under NCCL, else the CPU.
    device: Device,
}

// c10d backends are thread-safe; medgen drives the group from one thread at a time anyway.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

const ERR_LEN: usize = 4096;

fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
    let mut buf = vec![0 as c_char; ERR_LEN];
    if f(buf.as_mut_ptr(), ERR_LEN) == 0 {
        return Ok(());
    }
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    bail!("{what} failed: {msg}")
}

impl ProcessGroup {
    /// Joins the job: blocks until all `world_size` processes have reached the rendezvous, or
    /// fails after `timeout` (which also bounds every later collective: a dead or stuck peer makes
    /// the others fail instead of waiting forever).
    pub fn new(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<Self> {
        let b = CString::new(backend.name())?;
        let addr = CString::new(env.master_addr.as_str())?;
        let mut err = vec![0 as c_char; ERR_LEN];
        let raw = unsafe {
            medgen_dist_new(
                b.as_ptr(),
                addr.as_ptr(),
                env.master_port as i32,
                env.rank as i32,
                env.world_size as i32,
                timeout.as_secs_f64(),
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        if raw.is_null() {
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            bail!(
                "rank {} of {} could not join the {} group at {}:{}: {msg}",
                env.rank,
                env.world_size,
                backend.name(),
                env.master_addr,
                env.master_port
            );
        }
        let device = match backend {
            Backend::Nccl => Device::Cuda(env.local_rank),
            Backend::Gloo => Device::Cpu,
        };
        Ok(Self { raw, rank: env.rank, world_size: env.world_size, backend, device })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// In-place sum across the group; every rank passes tensors of the same shapes, in the same order.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        call("all-reduce", |e, l| unsafe {
            medgen_dist_all_reduce_sum(self.raw, ptrs.as_mut_ptr(), ptrs.len() as i32, e, l)
        })
        .with_context(|| format!("rank {} of {}", self.rank, self.world_size))
    }

    /// Every tensor replaced by `root`'s.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        call("broadcast", |e, l| unsafe {
            medgen_dist_broadcast(self.raw, ptrs.as_mut_ptr(), ptrs.len() as i32, root as i32, e, l)
        })
        .with_context(|| format!("rank {} of {}", self.rank, self.world_size))
    }

    pub fn barrier(&self) -> Result<()> {
        call("barrier", |e, l| unsafe { medgen_dist_barrier(self.raw, e, l) })
            .with_context(|| format!("rank {} of {}", self.rank, self.world_size))
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { medgen_dist_free(self.raw) }
    }
}

static GROUP: OnceLock<ProcessGroup> = OnceLock::new();

/// Makes `group` the process-wide one (once).
pub fn init(group: ProcessGroup) -> Result<&'static ProcessGroup> {
    let (rank, world) = (group.rank, group.world_size);
    GROUP.set(group).map_err(|_| anyhow::anyhow!("the process group is already initialised"))?;
    eprintln!("distributed: rank {rank} of {world} joined");
    Ok(GROUP.get().expect("just set"))
}

/// Joins the job described by the environment, if any: the training entry point calls this.
pub fn init_from_env(device: Device, timeout: Duration) -> Result<Option<&'static ProcessGroup>> {
    if let Some(g) = GROUP.get() {
        return Ok(Some(g));
    }
    match DistEnv::from_env()? {
        None => Ok(None),
        Some(env) => Ok(Some(init(ProcessGroup::new(&env, Backend::for_device(device), timeout)?)?)),
    }
}

pub fn group() -> Option<&'static ProcessGroup> {
    GROUP.get()
}

pub fn rank() -> usize {
    group().map_or(0, |g| g.rank)
}

pub fn world_size() -> usize {
    group().map_or(1, |g| g.world_size)
}

/// Rank 0, the one process that writes checkpoints, logs and pictures.
pub fn is_main() -> bool {
    rank() == 0
}

/// Replaces each gradient by its mean over the group, in flat buckets of about [`BUCKET_BYTES`]
/// (one collective each, all launched before the first is waited on). Nothing in a lone process.
pub fn average_gradients(grads: &[Tensor]) -> Result<()> {
    let Some(g) = group() else { return Ok(()) };
    let _guard = tch::no_grad_guard();
    let world = g.world_size as f64;
    // Buckets hold one dtype and device; grads keep their order, so every rank builds the same buckets.
    let mut buckets: Vec<Vec<&Tensor>> = Vec::new();
    let mut bytes = 0usize;
    for t in grads {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = buckets.last().is_some_and(|b: &Vec<&Tensor>| {
            b[0].kind() == t.kind() && b[0].device() == t.device() && bytes + size <= BUCKET_BYTES
        });
        if !fits {
            buckets.push(Vec::new());
            bytes = 0;
        }
        buckets.last_mut().expect("pushed").push(t);
        bytes += size;
    }
    let flats: Vec<Tensor> = buckets
        .iter()
        .map(|b| Tensor::f_cat(&b.iter().map(|t| t.f_flatten(0, -1)).collect::<Result<Vec<_>, _>>()?, 0))
        .collect::<Result<_, _>>()?;
    g.all_reduce_sum(&flats)?;
    for (bucket, mut flat) in buckets.iter().zip(flats) {
        let _ = flat.f_div_scalar_(world)?;
        let mut at = 0i64;
        for t in bucket {
            let n = t.numel() as i64;
            let mut dst = (*t).shallow_clone();
            dst.f_copy_(&flat.f_narrow(0, at, n)?.f_view(t.size().as_slice())?)?;
            at += n;
        }
    }
    Ok(())
}

/// Rank 0's values in every replica (as DDP does at construction): replicas start identical even
/// where initialisation is not deterministic across processes.
pub fn broadcast_from_main(tensors: &[Tensor]) -> Result<()> {
    match group() {
        Some(g) => g.broadcast(tensors, 0),
        None => Ok(()),
    }
}

/// Sums of per-rank values (e.g. validation loss totals and counts), in f64.
pub fn sum_across(values: &[f64]) -> Result<Vec<f64>> {
    let Some(g) = group() else { return Ok(values.to_vec()) };
    // NCCL reduces device tensors only.
    let t = Tensor::f_from_slice(values)?.f_to_kind(Kind::Double)?.f_to_device(g.device)?;
    g.all_reduce_sum(std::slice::from_ref(&t))?;
    Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?)
}
