//! Channels-last (NHWC) memory layout for 4-d tensors and for a model's convolution weights:
//! `torch.channels_last`, through tch's public API. tch 0.26 binds no `MemoryFormat`, but
//! `contiguous(memory_format=torch.channels_last)` is by definition an NHWC-contiguous copy
//! viewed back as NCHW, which `permute`, `contiguous` and `permute` give with the very strides
//! ATen would (ATen then infers the layout from the strides, as it does for every tensor).
//!
//! Only the layout changes: values, shapes and names stay, and every op reads the same numbers.
//! oneDNN (CPU) and cuDNN pick their NHWC kernels when an input or weight is channels-last, and
//! the sums of those kernels may be ordered differently, so results agree to float rounding
//! (not bit for bit) with the default layout. Whether that is faster depends on the machine:
//! `medgen bench denoise-step --channels-last` (and `bench/channels_last.py`) measures it. On the
//! 2-core AVX-512 CPU this project was built on, the reference configs' denoising step was 7-10 %
//! slower in fp32 and no faster under bf16 autocast, so sampling does not use it; a GPU (cuDNN's
//! NHWC kernels, tensor cores) is where it is worth measuring again.
use anyhow::{ensure, Context, Result};
use tch::nn::VarStore;
use tch::Tensor;

/// `t.contiguous(memory_format=torch.channels_last)` for a 4-d tensor (no copy when it already is).
pub fn to_channels_last(t: &Tensor) -> Result<Tensor> {
    let size = t.size();
    ensure!(size.len() == 4, "channels-last needs a 4-d (batch, channels, height, width) tensor, got shape {size:?}");
    if is_channels_last(t) {
        return Ok(t.shallow_clone());
    }
    Ok(t.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])?)
}

/// `t.is_contiguous(memory_format=torch.channels_last)`: ATen's test, in which dimensions of size 1
/// place no constraint on their stride (so a tensor can be both this and standard-contiguous).
pub fn is_channels_last(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    if size.len() != 4 {
        return false;
    }
    let mut expected = 1;
    for d in [1, 3, 2, 0] {
        if size[d] != 1 {
            if stride[d] != expected {
                return false;
            }
            expected *= size[d];
        }
    }
    true
}

/// Gives every 4-d variable of `vs` (the convolution weights) the channels-last layout, in place:
/// the modules built from `vs` share these tensors, so they run on the new layout from the next
/// call. Returns how many variables were converted. Either side of loading the weights is right:
/// the loader copies values into whatever layout a variable has.
pub fn varstore_to_channels_last(vs: &mut VarStore) -> Result<usize> {
    let _no_grad = tch::no_grad_guard();
    let mut converted = 0;
    for (name, mut var) in vs.variables() {
        if var.dim() != 4 || is_channels_last(&var) {
            continue;
        }
        let nhwc = to_channels_last(&var).with_context(|| format!("variable {name}"))?;
        // set_data swaps the storage and strides under the variable every module holds a handle to.
        var.f_set_data(&nhwc).with_context(|| format!("variable {name}: cannot take the channels-last layout"))?;
        converted += 1;
    }
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn strides_are_atens_channels_last_strides() {
        let t = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).reshape([2, 3, 4, 5]);
        assert!(!is_channels_last(&t));
        let c = to_channels_last(&t).unwrap();
        // torch.empty(2, 3, 4, 5, memory_format=torch.channels_last).stride()
        assert_eq!(c.stride(), [60, 1, 15, 3]);
        assert!(is_channels_last(&c) && !c.is_contiguous());
        assert!(c.equal(&t));
        // Size-1 dimensions: ATen's [N, 1, H, W] contiguous tensor is also channels-last.
        assert!(is_channels_last(&Tensor::zeros([2, 1, 4, 5], (Kind::Float, Device::Cpu))));
    }

    #[test]
    fn other_ranks_are_an_error_that_names_the_shape() {
        let e = to_channels_last(&Tensor::zeros([3, 4, 5], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(e.to_string().contains("[3, 4, 5]"), "{e}");
    }
}
