//! Synchronous data parallelism on PyTorch's own collective engine, c10d (src/shim/dist.cpp):
//! a TCPStore rendezvous served by rank 0 at `MASTER_ADDR:MASTER_PORT`, then a Gloo process group
//! (CPU; CUDA tensors staged through the host) or NCCL (GPUs; compiled in wherever libtorch has CUDA).
//! Every process holds a replica, trains on its shard of the data, and averages gradients with the
//! others before each optimiser step, as `torch.nn.parallel.DistributedDataParallel` does.
//!
//! The job is described the way PyTorch jobs are launched: torchrun's variables (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or those of `mpirun` (Open MPI's
//! `OMPI_COMM_WORLD_*`) or Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) with
//! `MASTER_ADDR`/`MASTER_PORT` set by the job script. `medgen launch --nproc N` starts N local ones.
//!
//! The group is process-wide (as `torch.distributed`'s default group): [`init`] makes it so and
//! returns the [`Membership`] that owns it; the training loops ask [`rank`], [`world_size`] and run
//! their backward passes through [`backward`], which averages the gradients (overlapping the
//! backward pass) and is a plain backward in a single process. The job ends with
//! [`Membership::leave`] (as `destroy_process_group`); a membership dropped without it (a failed
//! run) aborts the group instead.
use crate::train::optim::Adam;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Arc, Mutex, RwLock};
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
        cuda_device: i32,
        timeout_s: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn medgen_dist_shutdown(g: *mut c_void, err: *mut c_char, len: usize) -> i32;
    fn medgen_dist_abort(g: *mut c_void, err: *mut c_char, len: usize) -> i32;
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
    fn medgen_reducer_new(
        g: *mut c_void,
        ps: *mut *mut c_void,
        n: i32,
        bucket_bytes: i64,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn medgen_reducer_prepare(r: *mut c_void);
    fn medgen_reducer_finish(r: *mut c_void, err: *mut c_char, len: usize) -> i32;
}

/// DDP's default bucket size (`bucket_cap_mb` 25): gradients are all-reduced in flat buffers of
/// about this many bytes. `MEDGEN_BUCKET_CAP_MB` overrides it.
pub const BUCKET_BYTES: usize = 25 << 20;

fn bucket_bytes() -> Result<i64> {
    match var("MEDGEN_BUCKET_CAP_MB") {
        None => Ok(BUCKET_BYTES as i64),
        Some(v) => {
            let mb: f64 = parse("MEDGEN_BUCKET_CAP_MB", v)?;
            ensure!(mb > 0.0, "MEDGEN_BUCKET_CAP_MB must be positive");
            Ok((mb * (1 << 20) as f64) as i64)
        }
    }
}

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
        let master_port = parse(
            "MASTER_PORT",
            var("MASTER_PORT").with_context(|| {
                format!("{w}={world_size} but MASTER_PORT is not set: a free port on rank 0's host (torchrun sets it)")
            })?,
        )?;
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port }))
    }
}

/// This rank's device for a job that asked for `requested`, given the CUDA devices this process
/// sees. torchrun gives each process every GPU of its node and `LOCAL_RANK` says which is its own:
/// `cuda:LOCAL_RANK`. Slurm (`srun --gpus-per-task=1`, `--gpu-bind=single:1`) and per-rank
/// `CUDA_VISIBLE_DEVICES` show each task only its own GPU: `cuda:0`, whatever `LOCAL_RANK` is. A
/// local rank beyond the visible devices otherwise means more processes than GPUs on the node.
pub fn rank_device(requested: Device, local_rank: usize, visible: usize) -> Result<Device> {
    if !requested.is_cuda() {
        return Ok(requested);
    }
    match visible {
        0 => bail!("a CUDA device was requested but this process sees none (CUDA_VISIBLE_DEVICES, or no GPU here)"),
        n if local_rank < n => Ok(Device::Cuda(local_rank)),
        1 => Ok(Device::Cuda(0)),
        n => bail!(
            "local rank {local_rank} has no GPU of its own: this process sees {n} CUDA devices (cuda:0..cuda:{}), \
             so start at most {n} processes per node, or bind one GPU to each (srun --gpus-per-task=1, or \
             CUDA_VISIBLE_DEVICES per rank)",
            n - 1
        ),
    }
}

/// Whether this build has NCCL's process group (always, where libtorch has CUDA: build.rs).
pub fn nccl_compiled() -> bool {
    let backends = unsafe { medgen_dist_backends() };
    backends & 2 != 0
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
        if device.is_cuda() && nccl_compiled() {
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

/// A joined process group. [`ProcessGroup::shutdown`] ends it after a clean run; dropping it
/// aborts it (peers may be gone) and leaves its memory to the exiting process.
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
    /// the others fail instead of waiting forever). `device` is this rank's (see [`rank_device`]):
    /// a GPU becomes the current CUDA device before the group is made.
    pub fn new(env: &DistEnv, backend: Backend, device: Device, timeout: Duration) -> Result<Self> {
        let cuda_device = match device {
            Device::Cuda(i) => i as i32,
            _ => -1,
        };
        ensure!(backend == Backend::Gloo || cuda_device >= 0, "the NCCL backend needs a CUDA device, not {device:?}");
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
                cuda_device,
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
        // NCCL reduces device tensors only; Gloo's host path is the cheaper one for a few numbers.
        let device = match backend {
            Backend::Nccl => device,
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

impl ProcessGroup {
    /// Ends the group after a clean run, as `destroy_process_group`: NCCL flushes its work and
    /// joins its watchdog threads (left running, they abort the process at exit), then the group
    /// and its store are freed. Every rank must have passed its last collective.
    pub fn shutdown(mut self) -> Result<()> {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        call("process group shutdown", |e, l| unsafe { medgen_dist_shutdown(raw, e, l) })
            .with_context(|| format!("rank {} of {}", self.rank, self.world_size))
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.raw.is_null() {
            return;
        }
        if let Err(e) = call("process group abort", |e, l| unsafe { medgen_dist_abort(self.raw, e, l) }) {
            say_line(&format!("distributed: rank {}: {e:#}", self.rank));
        }
    }
}

static GROUP: RwLock<Option<Arc<ProcessGroup>>> = RwLock::new(None);

/// This process's place in the process-wide group: it is the process-wide one until
/// [`Membership::leave`] (or, after a failure, until dropped, which aborts it).
pub struct Membership(Option<Arc<ProcessGroup>>);

impl std::ops::Deref for Membership {
    type Target = ProcessGroup;
    fn deref(&self) -> &ProcessGroup {
        self.0.as_ref().expect("a membership holds its group until it ends")
    }
}

impl Membership {
    /// Ends the job for this process after its last collective (a barrier, at the end of training).
    pub fn leave(mut self) -> Result<()> {
        let g = self.detach().expect("a membership holds its group until it ends");
        let (rank, world) = (g.rank, g.world_size);
        let g = Arc::try_unwrap(g).map_err(|_| {
            anyhow::anyhow!("rank {rank} of {world}: the process group is still in use; cannot shut it down")
        })?;
        g.shutdown()?;
        say_line(&format!("distributed: rank {rank} of {world} left"));
        Ok(())
    }

    /// Stops being the process-wide group: later [`group`] calls see none, and the gradient
    /// reducers (which point at this group) are not reused.
    fn detach(&mut self) -> Option<Arc<ProcessGroup>> {
        let g = self.0.take()?;
        let mut global = GROUP.write().unwrap_or_else(|p| p.into_inner());
        if global.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &g)) {
            *global = None;
        }
        // The reducers themselves stay allocated: their hooks on the parameters point at them
        // (they only act while a backward pass through `backward` has armed them).
        REDUCERS.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Some(g)
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Dropping the last handle aborts the group (`ProcessGroup`'s Drop).
        drop(self.detach());
    }
}

/// Makes `group` the process-wide one (one at a time).
pub fn init(group: ProcessGroup) -> Result<Membership> {
    let mut global = GROUP.write().unwrap_or_else(|p| p.into_inner());
    ensure!(global.is_none(), "the process group is already initialised");
    let (rank, world) = (group.rank, group.world_size);
    let g = Arc::new(group);
    *global = Some(g.clone());
    say_line(&format!("distributed: rank {rank} of {world} joined"));
    Ok(Membership(Some(g)))
}

/// Joins the job described by the environment, if any, on `device` (this rank's: see
/// [`rank_device`]): the training entry point calls this.
pub fn init_from_env(device: Device, timeout: Duration) -> Result<Option<Membership>> {
    match DistEnv::from_env()? {
        None => Ok(None),
        Some(env) => Ok(Some(init(ProcessGroup::new(&env, Backend::for_device(device), device, timeout)?)?)),
    }
}

pub fn group() -> Option<Arc<ProcessGroup>> {
    GROUP.read().unwrap_or_else(|p| p.into_inner()).clone()
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

/// One optimiser's gradient reducer (src/shim/dist.cpp): hooks on its parameters fill flat
/// buckets during the backward pass and start each bucket's all-reduce as soon as it is full, so
/// communication overlaps the rest of the backward pass. Kept for the life of the process (the
/// hooks point at it).
struct Reducer(*mut c_void);
unsafe impl Send for Reducer {}

static REDUCERS: Mutex<BTreeMap<u64, Reducer>> = Mutex::new(BTreeMap::new());

/// `loss.backward()`, then in a data-parallel job every gradient of `opt`'s parameters is the mean
/// over the processes (a lone process: just the backward pass). Other parameters the loss reaches
/// keep their local gradients (e.g. the discriminator during the generator's step).
pub fn backward(loss: &Tensor, opt: &Adam) -> Result<()> {
    let Some(g) = group() else {
        loss.f_backward()?;
        return Ok(());
    };
    let raw = {
        let mut reducers = REDUCERS.lock().map_err(|_| anyhow::anyhow!("a reducer panicked"))?;
        let id = crate::train::optim::Optimizer::id(opt);
        if let std::collections::btree_map::Entry::Vacant(e) = reducers.entry(id) {
            let params = opt.trainable_params();
            let mut ptrs: Vec<*mut c_void> = params.iter().map(|t| t.as_ptr() as *mut c_void).collect();
            let mut err = vec![0 as c_char; ERR_LEN];
            let r = unsafe {
                medgen_reducer_new(
                    g.raw,
                    ptrs.as_mut_ptr(),
                    ptrs.len() as i32,
                    bucket_bytes()?,
                    err.as_mut_ptr(),
                    ERR_LEN,
                )
            };
            if r.is_null() {
                let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
                bail!("cannot set up gradient averaging: {msg}");
            }
            e.insert(Reducer(r));
        }
        reducers[&id].0
    };
    unsafe { medgen_reducer_prepare(raw) };
    loss.f_backward()?;
    call("gradient all-reduce", |e, l| unsafe { medgen_reducer_finish(raw, e, l) })
        .with_context(|| format!("rank {} of {}", g.rank, g.world_size))
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

/// One line on stderr in one write: the ranks of a job share their stderr, and `eprintln!` writes the pieces of its
/// format one by one (stderr is unbuffered), so two ranks' lines would interleave mid-line.
fn say_line(msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("{msg}\n").as_bytes());
}
