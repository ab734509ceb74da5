//! The channels-last layout changes no result: a ControlNet and a UNet whose weights and inputs are
//! channels-last give the default layout's outputs (to float rounding), and the layout really is
//! channels-last, in the weights and in what ATen computes from them.
mod common;

use common::max_abs_diff;
use medgen::checkpoint::Generation;
use medgen::memory_format::{is_channels_last, to_channels_last, varstore_to_channels_last};
use medgen::nets::{
    Conditioning, ControlNet, ControlNetConfig, DiffusionModelUNet, DiffusionModelUNetConfig, PerLevel,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The kernels of the two layouts may sum in another order; 1e-5 is far above that and far below any
/// layout mistake (a transposed weight changes outputs at the 1e-1 scale).
const TOL: f64 = 1e-5;

fn unet_config(conditioned: bool) -> DiffusionModelUNetConfig {
    DiffusionModelUNetConfig {
        in_channels: 3,
        out_channels: 3,
        num_res_blocks: PerLevel::Same(1),
        channels: vec![16, 32, 32],
        attention_levels: vec![false, true, true],
        norm_num_groups: 8,
        num_head_channels: PerLevel::Each(vec![0, 16, 32]),
        with_conditioning: conditioned,
        cross_attention_dim: conditioned.then_some(8),
        ..Default::default()
    }
}

fn controlnet_config(unet: &DiffusionModelUNetConfig) -> ControlNetConfig {
    ControlNetConfig {
        in_channels: unet.in_channels,
        num_res_blocks: unet.num_res_blocks.clone(),
        channels: unet.channels.clone(),
        attention_levels: unet.attention_levels.clone(),
        norm_num_groups: unet.norm_num_groups,
        num_head_channels: unet.num_head_channels.clone(),
        with_conditioning: unet.with_conditioning,
        cross_attention_dim: unet.cross_attention_dim,
        conditioning_embedding_in_channels: 1,
        conditioning_embedding_num_channels: vec![8, 16],
        ..Default::default()
    }
}

/// ControlNet then UNet, as one sampling step runs them.
fn denoise(unet: &DiffusionModelUNet, cn: &ControlNet, x: &Tensor, cond: &Tensor, ctx: Option<&Tensor>) -> Tensor {
    let _g = tch::no_grad_guard();
    let ts = Tensor::from_slice(&[500i64, 20]);
    let c = Conditioning { context: ctx, ..Default::default() };
    let res = cn.forward(x, &ts, cond, 1.0, &c).unwrap();
    unet.forward(x, &ts, &res.conditioning(ctx, None)).unwrap()
}

#[test]
fn channels_last_weights_and_inputs_give_the_default_layouts_outputs() {
    for (conditioned, generation) in [(true, Generation::Generative), (false, Generation::Monai)] {
        let case = format!("conditioned {conditioned}, {generation:?}");
        tch::manual_seed(0);
        let mut vs = VarStore::new(Device::Cpu);
        let ucfg = unet_config(conditioned);
        let unet = DiffusionModelUNet::new(&(vs.root() / "unet"), &ucfg, generation).unwrap();
        let cn = ControlNet::new(&(vs.root() / "cn"), &controlnet_config(&ucfg), generation).unwrap();
        // Random values everywhere: the zero-initialised output convolutions (ControlNet's zero convs,
        // proj_out) would otherwise hide their own layout.
        let (mut four_d, mut to_convert) = (0, 0);
        tch::no_grad(|| {
            // In name order: the same values for every run (the map's order changes between processes).
            let mut vars: Vec<_> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, mut v) in vars {
                four_d += usize::from(v.dim() == 4);
                // 1x1 kernels, (out, in, 1, 1), are both layouts at once.
                to_convert += usize::from(v.dim() == 4 && !is_channels_last(&v));
                let r = Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.2;
                v.copy_(&r);
            }
        });
        let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let cond = Tensor::rand([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        let ctx = conditioned.then(|| Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu)));
        let want = denoise(&unet, &cn, &x, &cond, ctx.as_ref());
        assert!(!is_channels_last(&want), "{case}: the default layout's output is already channels-last");

        let converted = varstore_to_channels_last(&mut vs).unwrap();
        assert!(to_convert > 20, "{case}: only {to_convert} of {four_d} convolution weights to convert");
        assert_eq!(converted, to_convert, "{case}: converted {converted} of the {to_convert} 4-d variables to convert");
        for (name, v) in vs.variables() {
            assert!(
                v.dim() != 4 || is_channels_last(&v),
                "{case}: {name} is not channels-last: strides {:?}",
                v.stride()
            );
        }
        // A second pass has nothing left to do.
        assert_eq!(varstore_to_channels_last(&mut vs).unwrap(), 0, "{case}");

        let (x_cl, cond_cl) = (to_channels_last(&x).unwrap(), to_channels_last(&cond).unwrap());
        assert!(is_channels_last(&x_cl) && !x_cl.is_contiguous(), "{case}: input strides {:?}", x_cl.stride());
        let got = denoise(&unet, &cn, &x_cl, &cond_cl, ctx.as_ref());
        // ATen chose the layout of the output from the weights and inputs: it is channels-last only if the
        // networks ran on channels-last tensors to the end.
        assert!(is_channels_last(&got), "{case}: output strides {:?}", got.stride());
        let err = max_abs_diff(&got, &want);
        println!("{case}: max abs diff {err:.3e}, max |out| {:.3e}", f64::try_from(want.abs().max()).unwrap());
        assert!(err <= TOL, "{case}: channels-last output differs by {err:e} > {TOL:e}");
    }
}

#[test]
fn a_tensor_that_is_not_4d_is_an_error_naming_its_shape() {
    let e = to_channels_last(&Tensor::zeros([2, 3, 4, 5, 6], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(e.to_string().contains("[2, 3, 4, 5, 6]"), "{e}");
}
