//! From-scratch networks as PyTorch makes them: built, and so initialised, on the CPU generator, then moved to
//! the training device (`Model(...).to(device)`). Built directly on a CUDA store, tch would draw the initial
//! weights from the CUDA generator: the same seed would give other weights on every device.
use anyhow::Result;
use tch::nn::VarStore;
use tch::Device;

/// Builds a network on a CPU store (`build` may also fill it, e.g. from another checkpoint) and moves the
/// store, every variable and buffer, to `device`.
pub fn build_on_cpu<M>(device: Device, build: impl FnOnce(&VarStore) -> Result<M>) -> Result<(VarStore, M)> {
    let mut vs = VarStore::new(Device::Cpu);
    let model = build(&vs)?;
    if device != Device::Cpu {
        vs.set_device(device);
    }
    Ok((vs, model))
}
