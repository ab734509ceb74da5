//! From-scratch networks are initialised on the CPU generator and then moved, as PyTorch builds a model and
//! calls `.to(device)`: the same seed gives the same initial weights on every device.
mod common;

use common::run::configs;
use medgen::checkpoint::Generation;
use medgen::config;
use medgen::nets::DiffusionModelUNet;
use medgen::train::init::build_on_cpu;
use tch::nn::VarStore;
use tch::{Cuda, Device};

/// The UNet of the end-to-end tests, built for `device` after seeding with `seed`; its weights on the CPU.
fn initial_weights(device: Device, seed: i64) -> Vec<(String, tch::Tensor)> {
    let tmp = tempfile::tempdir().unwrap();
    let [_, ldm, _] = configs(tmp.path(), 1);
    let ucfg = config::unet_config(&ldm).unwrap();
    tch::manual_seed(seed);
    let (vs, _unet) = build_on_cpu(device, |vs: &VarStore| {
        // Whatever the target device, the draws happen on a CPU store.
        assert_eq!(vs.device(), Device::Cpu);
        DiffusionModelUNet::new(&vs.root(), &ucfg, Generation::Monai)
    })
    .unwrap();
    assert_eq!(vs.device(), device);
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .map(|(k, v)| {
            assert_eq!(v.device(), device, "{k} was not moved");
            (k, v.to_device(Device::Cpu))
        })
        .collect()
}

fn equal(a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((ka, ta), (kb, tb))| ka == kb && ta.equal(tb))
}

#[test]
fn the_same_seed_gives_the_same_initial_weights_on_every_device() {
    let cpu = initial_weights(Device::Cpu, 7);
    assert!(cpu.iter().any(|(_, t)| t.abs().sum(tch::Kind::Double).double_value(&[]) > 0.0), "nothing was drawn");
    assert!(equal(&cpu, &initial_weights(Device::Cpu, 7)), "two CPU builds with one seed differ");
    assert!(!equal(&cpu, &initial_weights(Device::Cpu, 8)), "the seed does not reach the initialisation");
    if Cuda::is_available() {
        assert!(equal(&cpu, &initial_weights(Device::Cuda(0), 7)), "CUDA initial weights differ from the CPU's");
        println!("CPU and CUDA initial weights compared: equal");
    } else {
        eprintln!("NOT RUN: no CUDA device here, so the CPU-vs-CUDA comparison of initial weights did not run");
    }
}
