//! The CUDA paths issue 15 fixed by reading, each checked where it runs: a one-rank process group
//! on the device, networks initialised on the CPU generator and moved, the deterministic flags,
//! and the loss scaler's unscale of device gradients. Each has a CPU half (Gloo, CPU stores, CPU
//! tensors) so the row is exercised without a GPU.
use super::forward::Net;
use super::{Report, Status};
use crate::device::{set_deterministic, Determinism};
use crate::distributed::{self, Backend, DistEnv, ProcessGroup};
use crate::train::grad_scaler::{GradScaler, GradScalerConfig};
use crate::train::init::build_on_cpu;
use crate::train::optim::{Adam, AdamConfig};
use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Bounds the rendezvous and every collective of the one-rank group: a stuck NCCL or Gloo call
/// fails the row instead of hanging the check.
const GROUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs last of all groups: the CPU half of the determinism row changes process-wide flags
/// (deterministic-algorithms mode fills fresh tensors), which the earlier rows must not see.
pub(super) fn run(report: &mut Report, cuda: Option<Device>) {
    report.check("process group (gloo): all-reduce, barrier, leave; joined twice", "cpu", || {
        let first = group_round_trip(Device::Cpu)?;
        // The group is process-wide (`distributed::init`): a second job in the same process must be
        // able to join once the first has left, as the CUDA half below does after this one.
        let second = group_round_trip(Device::Cpu)?;
        Ok((format!("{first}; again: {second}"), Status::Pass))
    });
    let name = "process group on the device: all-reduce, barrier, leave";
    match cuda {
        Some(d) => report.check(name, &dev(d), || Ok((group_round_trip(d)?, Status::Pass))),
        None => report.skip(name, "cuda", "no CUDA"),
    }

    report.check("init on the CPU generator: same seed, same weights", "cpu", || {
        let (a, seen) = build_unet(Device::Cpu)?;
        let (b, _) = build_unet(Device::Cpu)?;
        ensure!(seen == Device::Cpu, "the build closure saw a store on {seen:?}, not the CPU");
        let n = bit_equal(&a, &b)?;
        Ok((format!("{n} variables bit-equal; built on a CPU store"), Status::Pass))
    });
    let name = "init on the CPU generator: cuda build = cpu build";
    match cuda {
        Some(d) => report.check(name, &dev(d), || {
            let (on_cuda, seen) = build_unet(d)?;
            ensure!(seen == Device::Cpu, "the build closure saw a store on {seen:?}, not the CPU");
            ensure!(on_cuda.device() == d, "the store is on {:?} after the move, not {d:?}", on_cuda.device());
            for (k, t) in on_cuda.variables() {
                ensure!(t.device() == d, "variable {k} is on {:?} after the move, not {d:?}", t.device());
            }
            let (on_cpu, _) = build_unet(Device::Cpu)?;
            let n = bit_equal(&on_cpu, &on_cuda)?;
            Ok((format!("{n} variables on {d:?}, bit-equal to the CPU build once moved back"), Status::Pass))
        }),
        None => report.skip(name, "cuda", "no CUDA"),
    }

    report.check("determinism flags: set_deterministic() reads back", "cpu", || {
        let before = Determinism::current()?.is_deterministic();
        set_deterministic()?;
        let d = Determinism::current()?;
        ensure!(d.is_deterministic(), "after set_deterministic(): {d:?}");
        Ok((format!("deterministic before: {before}; after: {d:?}"), Status::Pass))
    });
    let name = "determinism flags: still set after the CUDA rows";
    match cuda {
        // gpu-check's `run` set them before the first CUDA row; nothing since may have undone them.
        Some(d) => report.check(name, &dev(d), || {
            let flags = Determinism::current()?;
            ensure!(flags.is_deterministic(), "the flags gpu-check set at its start have changed: {flags:?}");
            Ok((format!("{flags:?}"), Status::Pass))
        }),
        None => report.skip(name, "cuda", "no CUDA"),
    }

    let name = "grad scaler: unscale with one inf skips the step, then a finite one steps";
    report.check(name, "cpu", || Ok((grad_scaler_round(Device::Cpu)?, Status::Pass)));
    match cuda {
        Some(d) => report.check(name, &dev(d), || Ok((grad_scaler_round(d)?, Status::Pass))),
        None => report.skip(name, "cuda", "no CUDA"),
    }
}

fn dev(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        d => format!("{d:?}").to_lowercase(),
    }
}

/// A one-rank group on `device` with the trainer's backend choice, made the process-wide one: an
/// all-reduce of a tensor on the device (unchanged for one rank, and still there), a barrier, then
/// `leave()`, after which no group is left.
fn group_round_trip(device: Device) -> Result<String> {
    let t0 = Instant::now();
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .context("no free loopback port")?
        .port();
    let env = DistEnv { rank: 0, world_size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: port };
    let backend = Backend::for_device(device);
    ensure!(distributed::group().is_none(), "a process group is already set before the check joins one");
    let member = distributed::init(ProcessGroup::new(&env, backend, device, GROUP_TIMEOUT)?)?;
    ensure!(member.backend() == backend, "joined with {:?}, asked for {backend:?}", member.backend());
    ensure!(distributed::world_size() == 1 && distributed::rank() == 0, "the process-wide group is not this one");
    let x = Tensor::f_arange(6, (Kind::Float, Device::Cpu))?.f_to_device(device)?;
    let expected = x.f_detach_copy()?;
    member.all_reduce_sum(std::slice::from_ref(&x))?;
    ensure!(x.device() == device, "the all-reduced tensor moved to {:?}", x.device());
    ensure!(bool::try_from(x.f_eq_tensor(&expected)?.f_all()?)?, "one rank's all-reduce changed the values");
    member.barrier()?;
    member.leave()?;
    ensure!(distributed::group().is_none(), "a process group is still set after leave()");
    let secs = t0.elapsed().as_secs_f64();
    ensure!(secs < GROUP_TIMEOUT.as_secs_f64(), "took {secs:.1} s, over the {GROUP_TIMEOUT:?} bound");
    Ok(format!("{backend:?} on 127.0.0.1:{port}, {secs:.1} s"))
}

/// The forward check's small UNet from seed 7 through `build_on_cpu(device)`; also the device of
/// the store the build closure saw.
fn build_unet(device: Device) -> Result<(VarStore, Device)> {
    tch::manual_seed(7);
    let mut seen = None;
    let (vs, _net) = build_on_cpu(device, |vs| {
        seen = Some(vs.device());
        Net::build("DiffusionModelUNet", vs)
    })?;
    Ok((vs, seen.context("the build closure was not called")?))
}

/// Every variable of `a` bit-equal to `b`'s of the same name (both read on the CPU); their count.
fn bit_equal(a: &VarStore, b: &VarStore) -> Result<usize> {
    let (a, b): (HashMap<String, Tensor>, HashMap<String, Tensor>) = (a.variables(), b.variables());
    ensure!(a.len() == b.len(), "{} variables against {}", a.len(), b.len());
    ensure!(!a.is_empty(), "the network has no variables");
    for (k, x) in &a {
        let y = b.get(k).with_context(|| format!("variable {k} is missing from the second build"))?;
        let (x, y) = (x.f_to_device(Device::Cpu)?, y.f_to_device(Device::Cpu)?);
        ensure!(x.size() == y.size(), "variable {k}: shape {:?} against {:?}", x.size(), y.size());
        ensure!(x.f_equal(&y)?, "variable {k} differs");
    }
    Ok(a.len())
}

/// `GradScaler` on gradients on `device`: an iteration with one inf gradient sets found-inf (the
/// step is skipped, the scale backs off, the finite gradients are unscaled exactly), then a
/// finite iteration steps.
fn grad_scaler_round(device: Device) -> Result<String> {
    let opts = (Kind::Float, device);
    let w = Tensor::f_from_slice(&[1f32, 2.0, 3.0])?.f_to_device(device)?.set_requires_grad(true);
    let before = w.f_detach_copy()?;
    let mut opt = Adam::new(AdamConfig::adam(0.1), vec![("w".into(), w.shallow_clone())])?;
    let mut scaler = GradScaler::new(GradScalerConfig::default())?;
    let init = scaler.get_scale();

    let x = Tensor::f_from_slice(&[1f32, f32::INFINITY, 2.0])?.f_to_device(device)?;
    scaler.scale(&w.f_mul(&x)?.f_sum(Kind::Float)?)?.f_backward()?;
    scaler.unscale_(&mut opt)?;
    let grads = opt.grads()?;
    ensure!(grads.len() == 1 && grads[0].device() == device, "the gradient is not on {device:?}");
    let g = Vec::<f32>::try_from(&grads[0].f_to_device(Device::Cpu)?)?;
    ensure!(g[0] == 1.0 && g[2] == 2.0 && !g[1].is_finite(), "unscaled gradient {g:?}, expected [1, inf, 2]");
    ensure!(!scaler.step(&mut opt)?, "stepped although a gradient was inf");
    ensure!(w.f_detach()?.f_equal(&before)?, "the skipped step changed the weights");
    scaler.update()?;
    let backed_off = scaler.get_scale();
    ensure!(backed_off == init * 0.5, "scale {backed_off} after an inf, expected {}", init * 0.5);

    opt.zero_grad();
    let x = Tensor::f_ones([3], opts)?;
    scaler.scale(&w.f_mul(&x)?.f_sum(Kind::Float)?)?.f_backward()?;
    ensure!(scaler.step(&mut opt)?, "a finite iteration did not step");
    scaler.update()?;
    ensure!(w.device() == device, "the weights moved to {:?}", w.device());
    ensure!(!w.f_detach()?.f_equal(&before)?, "the finite step left the weights as they were");
    Ok(format!("scale {init} -> {backed_off} after the inf; finite step taken"))
}
