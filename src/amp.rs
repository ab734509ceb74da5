//! Mixed precision: which reduced dtype autocast uses, and a scoped autocast region on the device
//! a model runs on (torch.autocast's enter/exit), through the C++ shim `src/shim/autocast.cpp`.
//! Both reduced dtypes run on CUDA and on the CPU (as `torch.autocast("cpu", dtype)`).
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use std::os::raw::c_int;
use tch::Device;

extern "C" {
    fn medgen_autocast_set(cuda: c_int, enabled: c_int, bf16: c_int) -> c_int;
    fn medgen_autocast_restore(cuda: c_int, state: c_int);
    fn medgen_autocast_increment_nesting() -> c_int;
    fn medgen_autocast_decrement_nesting();
}

/// The precision of the forward passes of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32 (the parity tests' setting).
    #[default]
    Fp32,
    /// Autocast to float16, with a dynamic loss scaler (the reference's setting on GPUs).
    Fp16,
    /// Autocast to bfloat16; its float32 exponent range needs no loss scaling.
    Bf16,
}

impl Precision {
    /// Whether gradients need a dynamic loss scaler.
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::Fp16
    }

    /// Enters an autocast region for `device` (a no-op region for fp32), left when the guard drops.
    pub fn autocast(self, device: Device) -> Autocast {
        if self == Precision::Fp32 {
            return Autocast { restore: None, _thread_local: PhantomData };
        }
        let cuda = c_int::from(device.is_cuda());
        // SAFETY: plain calls into ATen's thread-local autocast state; no pointers cross.
        let state = unsafe {
            medgen_autocast_increment_nesting();
            medgen_autocast_set(cuda, 1, c_int::from(self == Precision::Bf16))
        };
        Autocast { restore: Some((cuda, state)), _thread_local: PhantomData }
    }
}

/// An autocast region; dropping it restores the previous state (regions nest). ATen's autocast
/// state is thread-local, so the guard is `!Send`: dropped on another thread it would restore
/// that thread's state and leave this one's region open.
#[must_use = "autocast ends when this guard is dropped"]
pub struct Autocast {
    restore: Option<(c_int, c_int)>,
    _thread_local: PhantomData<*const ()>,
}

impl Drop for Autocast {
    fn drop(&mut self) {
        if let Some((cuda, state)) = self.restore {
            // SAFETY: as in `Precision::autocast`.
            unsafe {
                medgen_autocast_restore(cuda, state);
                medgen_autocast_decrement_nesting();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails to compile, rather than at run time, once `Autocast` is `Send`: with a `Send` type both impls apply
    /// and the call below is ambiguous.
    #[test]
    fn the_guard_stays_on_its_thread() {
        trait AmbiguousIfSend<A> {
            fn check() {}
        }
        impl<T: ?Sized> AmbiguousIfSend<()> for T {}
        impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
        <Autocast as AmbiguousIfSend<_>>::check();
        let _fp32 = Precision::Fp32.autocast(Device::Cpu);
    }
}
