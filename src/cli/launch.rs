//! `medgen launch --nproc N -- train ...`: one data-parallel job of N local processes, as
//! `torchrun --standalone --nproc-per-node N` starts one: each child gets torchrun's variables
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`). When one
//! fails, the others get `--grace` seconds to fail on their own (their collectives error out
//! once a peer is gone) and are then killed; the launcher exits non-zero naming the rank.
use anyhow::{bail, ensure, Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Processes to start on this machine.
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Where rank 0 serves the rendezvous.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Its port (default: a free one).
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds the other processes get to stop by themselves after one has failed.
    #[arg(long, default_value_t = 30.0)]
    grace: f64,
    /// The medgen command each process runs, after `--` (e.g. `-- train ldm --config ...`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

fn free_port(addr: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((addr, 0)).with_context(|| format!("cannot bind a port on {addr}"))?;
    Ok(l.local_addr()?.port())
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.nproc >= 1, "--nproc must be at least 1");
    let exe = std::env::current_exe().context("cannot find the medgen executable")?;
    let port = match a.master_port {
        Some(p) => p,
        None => free_port(&a.master_addr)?,
    };
    // Ctrl-C reaches every process of the terminal's group: the children checkpoint and stop; the
    // launcher keeps waiting for them instead of dying first.
    let _ = crate::train::run::interrupt_flag();
    // As torchrun: processes sharing a machine share its cores, unless told otherwise.
    let threads = std::env::var("OMP_NUM_THREADS").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let t = (cores / a.nproc).max(1);
        eprintln!("launch: OMP_NUM_THREADS={t} per process ({cores} cores, {} processes)", a.nproc);
        t.to_string()
    });
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(a.nproc);
    for rank in 0..a.nproc {
        let child = Command::new(&exe)
            .env("OMP_NUM_THREADS", &threads)
            .args(&a.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", a.nproc.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc.to_string())
            .env("MASTER_ADDR", &a.master_addr)
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        children.push((rank, child));
    }
    let mut failed: Option<(usize, ExitStatus, Instant)> = None;
    let mut running = a.nproc;
    while running > 0 {
        std::thread::sleep(Duration::from_millis(100));
        for (rank, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                if !status.success() && failed.is_none() {
                    eprintln!("launch: rank {rank} exited with {status}; stopping the job");
                    failed = Some((*rank, status, Instant::now()));
                }
            }
        }
        running = children.iter_mut().filter_map(|(_, c)| c.try_wait().ok()).filter(Option::is_none).count();
        if let Some((_, _, at)) = failed {
            if running > 0 && at.elapsed() > Duration::from_secs_f64(a.grace) {
                for (rank, child) in children.iter_mut() {
                    if matches!(child.try_wait(), Ok(None)) {
                        eprintln!("launch: rank {rank} did not stop within {} s: killed", a.grace);
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
                running = 0;
            }
        }
    }
    if let Some((rank, status, _)) = failed {
        bail!("rank {rank} of {} failed ({status})", a.nproc);
    }
    Ok(())
}
