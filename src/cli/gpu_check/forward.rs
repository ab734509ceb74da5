//! Each network's forward pass on CUDA against the CPU: small random networks built on the CPU
//! from a fixed seed, their weights copied to the GPU, the same inputs on both.
use super::{Report, Status};
use crate::checkpoint::Generation;
use crate::nets::patch_discriminator::{PatchDiscriminator, PatchDiscriminatorConfig};
use crate::nets::{AutoencoderKL, Conditioning, ControlNet, DiffusionModelUNet};
use anyhow::{ensure, Context, Result};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Cuda, Device, Kind, Tensor};

/// fp32 with no TF32 anywhere: the bound on `max |cuda - cpu| / max |cpu|`.
const TOL_FP32: f64 = 1e-4;

/// Boxed: the networks' structs are a few kB each.
pub(super) enum Net {
    Aekl(Box<AutoencoderKL>),
    Unet(Box<DiffusionModelUNet>),
    Cn(Box<ControlNet>),
    Discriminator(Box<PatchDiscriminator>),
}

impl Net {
    pub(super) fn build(name: &str, vs: &VarStore) -> Result<Self> {
        let p = vs.root();
        Ok(match name {
            "AutoencoderKL" => {
                Net::Aekl(Box::new(AutoencoderKL::new(&p, &from_json(aekl_params())?, Generation::Monai)?))
            }
            "DiffusionModelUNet" => {
                let mut params = unet_params();
                params["out_channels"] = json!(3);
                Net::Unet(Box::new(DiffusionModelUNet::new(&p, &from_json(params)?, Generation::Monai)?))
            }
            "ControlNet" => {
                let mut params = unet_params();
                params["conditioning_embedding_num_channels"] = json!([8, 8]);
                Net::Cn(Box::new(ControlNet::new(&p, &from_json(params)?, Generation::Monai)?))
            }
            _ => {
                let cfg: PatchDiscriminatorConfig = from_json(
                    json!({"spatial_dims": 2, "channels": 8, "num_layers_d": 3, "in_channels": 1, "out_channels": 1}),
                )?;
                Net::Discriminator(Box::new(PatchDiscriminator::new(&p, &cfg)?))
            }
        })
    }

    /// The inputs, drawn on the CPU from `seed`.
    fn inputs(&self, seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        let randn = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[17i64, 503]);
        match self {
            Net::Aekl(_) | Net::Discriminator(_) => vec![randn(&[2, 1, 64, 64])],
            Net::Unet(_) => vec![randn(&[2, 3, 32, 32]), t],
            Net::Cn(_) => vec![randn(&[2, 3, 32, 32]), t, randn(&[2, 1, 64, 64])],
        }
    }

    fn forward(&self, x: &[Tensor]) -> Result<Vec<Tensor>> {
        let _guard = tch::no_grad_guard();
        let cond = Conditioning::default();
        Ok(match self {
            Net::Aekl(m) => {
                let (mu, sigma) = m.encode(&x[0])?;
                vec![m.decode(&mu)?, mu, sigma]
            }
            Net::Unet(m) => vec![m.forward(&x[0], &x[1], &cond)?],
            Net::Cn(m) => {
                let out = m.forward(&x[0], &x[1], &x[2], 1.0, &cond)?;
                let mut v = out.down_block_res_samples;
                v.push(out.mid_block_res_sample);
                v
            }
            Net::Discriminator(m) => m.forward_t(&x[0], false),
        })
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v.clone()).with_context(|| format!("network parameters {v}"))
}

/// Two levels with attention (the reference's blocks, shrunk).
fn aekl_params() -> serde_json::Value {
    json!({"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [8, 16], "latent_channels": 3,
           "num_res_blocks": 1, "attention_levels": [false, true], "norm_num_groups": 4,
           "with_encoder_nonlocal_attn": true, "with_decoder_nonlocal_attn": true})
}

fn unet_params() -> serde_json::Value {
    json!({"spatial_dims": 2, "in_channels": 3, "num_res_blocks": 1, "channels": [8, 16],
           "attention_levels": [false, true], "num_head_channels": [0, 8], "norm_num_groups": 4})
}

/// `max |a - b| / max |a|` over all outputs, after checking shapes and finiteness.
pub(super) fn relative_error(cpu: &[Tensor], other: &[Tensor]) -> Result<f64> {
    ensure!(cpu.len() == other.len(), "{} outputs on the CPU, {} on CUDA", cpu.len(), other.len());
    let (mut diff, mut scale) = (0f64, 0f64);
    for (i, (a, b)) in cpu.iter().zip(other).enumerate() {
        ensure!(a.size() == b.size(), "output {i}: shape {:?} on the CPU, {:?} on CUDA", a.size(), b.size());
        let b = b.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?;
        let a = a.f_to_kind(Kind::Double)?;
        ensure!(all_finite(&b)?, "output {i} on CUDA is not finite");
        diff = diff.max(f64::try_from((&a - &b).abs().max())?);
        scale = scale.max(f64::try_from(a.abs().max())?);
    }
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

pub(super) fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(bool::try_from(t.f_isfinite()?.all())?)
}

pub(super) fn shapes(ts: &[Tensor]) -> String {
    let s: Vec<String> = ts.iter().map(|t| format!("{:?}", t.size())).collect();
    if s.len() > 3 {
        format!("{} outputs, {} ... {}", s.len(), s[0], s[s.len() - 1])
    } else {
        s.join(", ")
    }
}

pub(super) fn run(report: &mut Report, cuda: Option<Device>) {
    for name in ["AutoencoderKL", "DiffusionModelUNet", "ControlNet", "PatchDiscriminator"] {
        let check = format!("forward {name} (fp32)");
        let mut cpu: Option<(VarStore, Net, Vec<Tensor>, Vec<Tensor>)> = None;
        report.check(&check, "cpu", || {
            tch::manual_seed(0);
            let vs = VarStore::new(Device::Cpu);
            let net = Net::build(name, &vs)?;
            let x = net.inputs(1);
            let y = net.forward(&x)?;
            for (i, t) in y.iter().enumerate() {
                ensure!(all_finite(t)?, "output {i} is not finite");
            }
            let result = format!("finite; {}", shapes(&y));
            cpu = Some((vs, net, x, y));
            Ok((result, Status::Pass))
        });
        let Some(cuda) = cuda else {
            report.skip(&format!("forward {name}: cuda vs cpu"), "cuda", "no CUDA");
            continue;
        };
        let Some((vs_cpu, _, x, y)) = cpu else {
            report.skip(&format!("forward {name}: cuda vs cpu"), "cuda", "the CPU forward failed");
            continue;
        };
        // `run` made the process deterministic (TF32 off in cuDNN and cuBLAS): both kernel families are
        // held to the fp32 bound, libtorch's own convolutions (cuDNN off) and cuDNN's.
        for (cudnn, tol, how) in
            [(false, TOL_FP32, "cuDNN off, no TF32"), (true, TOL_FP32, "cuDNN deterministic, no TF32")]
        {
            report.check(&format!("forward {name}: cuda vs cpu ({how})"), &format!("{cuda:?}"), || {
                let was = Cuda::user_enabled_cudnn();
                Cuda::set_user_enabled_cudnn(cudnn);
                let r = compare_on(cuda, name, &vs_cpu, &x, &y);
                Cuda::set_user_enabled_cudnn(was);
                let rel = r?;
                let result = format!("max |cuda - cpu| / max |cpu| = {rel:.2e} (bound {tol:.0e})");
                Ok((result, if rel <= tol { Status::Pass } else { Status::Fail(format!("above {tol:.0e}")) }))
            });
        }
    }
}

fn compare_on(cuda: Device, name: &str, vs_cpu: &VarStore, x: &[Tensor], y: &[Tensor]) -> Result<f64> {
    let mut vs = VarStore::new(cuda);
    let net = Net::build(name, &vs)?;
    vs.copy(vs_cpu).context("copying the CPU weights to CUDA")?;
    let xs = x.iter().map(|t| t.f_to_device(cuda)).collect::<Result<Vec<_>, _>>()?;
    let out = net.forward(&xs)?;
    relative_error(y, &out)
}
