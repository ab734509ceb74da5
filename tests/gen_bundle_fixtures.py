"""MONAI model-zoo bundle fixtures for `medgen convert --bundle` (tests/bundle_import.rs).

Each case is a bundle-shaped folder written with the layout of a published generative bundle: its config files
(`configs/inference.json`, and `configs/train_*.json` where the published bundle has them, with the same keys,
`_target_`s, `@` references and `$` expressions, including ones medgen must leave alone), `configs/metadata.json`
and `models/*.pt` state dicts in the monai-generative 0.2 key layout the published checkpoints use. Parameters are
the published ones for the 2-D bundle; the 3-D bundles keep their structure (levels, attention, heads per level,
residual blocks, conditioning) at narrower widths, so that the test stays small. Read from the model-zoo repository
(Project-MONAI/model-zoo: brats_mri_generative_diffusion v1.0.9 and v1.1.x, brats_mri_axial_slices_generative_diffusion
v1.1.x, brain_image_synthesis_latent_diffusion_model).

The networks are built with monai-generative 0.2.3 (the library the checkpoints were saved from), perturbed, saved,
and run: <out>/<case>.io.safetensors holds a latent, its decode, a UNet input, timestep (and context) and the UNet's
output, which the converted weights must reproduce.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

from fixtures_common import perturb

from generative.networks.nets import AutoencoderKL as OldAEKL
from generative.networks.nets import DiffusionModelUNet as OldUNet

SEED = 31


def gen_names(p):
    """MONAI-core parameter names to monai-generative's."""
    p = {k: v for k, v in p.items() if k not in ("include_fc", "use_combined_linear")}
    p["num_channels"] = p.pop("channels")
    return p


def ddim(beta_end):
    return {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": beta_end,
            "schedule": "scaled_linear_beta", "clip_sample": False}


def brats(spatial_dims, latent_channels, latent_spatial, ae, unet, monai_core):
    """brats_mri_generative_diffusion (3-D) / brats_mri_axial_slices_generative_diffusion (2-D) inference.json."""
    nets = "monai.networks.nets" if monai_core else "generative.networks.nets"
    ae_target = f"{nets}.autoencoderkl.AutoencoderKL" if monai_core else f"{nets}.AutoencoderKL"
    unet_target = f"{nets}.diffusion_model_unet.DiffusionModelUNet" if monai_core else f"{nets}.DiffusionModelUNet"
    sched = "monai.networks.schedulers.ddim.DDIMScheduler" if monai_core else "generative.networks.schedulers.DDIMScheduler"
    load = "load_old_state_dict" if monai_core else "load_state_dict"
    names = (lambda p: p) if monai_core else gen_names
    inference = {
        "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/output'",
        "create_output_dir": "$Path(@output_dir).mkdir(exist_ok=True)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "output_postfix": "$datetime.now().strftime('sample_%Y%m%d_%H%M%S')",
        "channel": 0,
        "spatial_dims": spatial_dims,
        "image_channels": 1,
        "latent_channels": latent_channels,
        "latent_shape": ["@latent_channels", *latent_spatial],
        "autoencoder_def": {"_target_": ae_target, "spatial_dims": "@spatial_dims", "in_channels": "@image_channels",
                            "out_channels": "@image_channels", "latent_channels": "@latent_channels", **names(ae)},
        "network_def": {"_target_": unet_target, "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels",
                        "out_channels": "@latent_channels", **names(unet)},
        "load_autoencoder_path": "$@bundle_root + '/models/model_autoencoder.pt'",
        "load_autoencoder": f"$@autoencoder_def.{load}(torch.load(@load_autoencoder_path))",
        "autoencoder": "$@autoencoder_def.to(@device)",
        "load_diffusion_path": "$@model_dir + '/model.pt'",
        "load_diffusion": f"$@network_def.{load}(torch.load(@load_diffusion_path))",
        "diffusion": "$@network_def.to(@device)",
        "noise_scheduler": {"_target_": sched, "_requires_": ["@load_diffusion", "@load_autoencoder"], **ddim(0.0195)},
        "noise": "$torch.randn([1]+@latent_shape).to(@device)",
        "set_timesteps": "$@noise_scheduler.set_timesteps(num_inference_steps=50)",
        "inferer": {"_target_": "scripts.ldm_sampler.LDMSampler", "_requires_": "@set_timesteps"},
        "saver": {"_target_": "SaveImage", "_requires_": "@create_output_dir", "output_dir": "@output_dir",
                  "output_postfix": "@output_postfix"},
        "run": ["$@inferer.run(@noise, @autoencoder, @diffusion, @noise_scheduler, @saver)"],
    }
    train_ae = {
        "gnetwork": "$@autoencoder_def.to(@device)",
        "discriminator_def": {"_target_": f"{nets}.PatchDiscriminator", "spatial_dims": "@spatial_dims",
                              "num_layers_d": 3, ("channels" if monai_core else "num_channels"): 32,
                              "in_channels": 1, "out_channels": 1, "norm": "INSTANCE"},
        "perceptual_loss_def": {"_target_": "monai.losses.perceptual.PerceptualLoss" if monai_core
                                else "generative.losses.PerceptualLoss", "spatial_dims": "@spatial_dims",
                                "network_type": "squeeze", "is_fake_3d": spatial_dims == 3, "fake_3d_ratio": 0.2},
        "optimizer_G": {"_target_": "torch.optim.Adam", "params": "$@gnetwork.parameters()", "lr": 1e-5},
    }
    train_diffusion = {
        "noise_scheduler": {"_target_": sched.replace("ddim.DDIMScheduler", "ddpm.DDPMScheduler")
                            .replace("DDIMScheduler", "DDPMScheduler"), "_requires_": ["@load_autoencoder"],
                            "schedule": "scaled_linear_beta", "num_train_timesteps": 1000, "beta_start": 0.0015,
                            "beta_end": 0.0195},
        "scale_factor": "$scripts.utils.compute_scale_factor(@autoencoder,@train#dataloader,@device)",
        "train": {"inferer": {"_target_": "monai.inferers.LatentDiffusionInferer", "scheduler": "@noise_scheduler",
                              "scale_factor": "@scale_factor"}},
    }
    return {"inference.json": inference, "train_autoencoder.json": train_ae, "train_diffusion.json": train_diffusion}


def brain(ae, unet, noise):
    """brain_image_synthesis_latent_diffusion_model inference.json (MONAI core, `load_old` functions)."""
    inference = {
        "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "dataset_dir": "", "dataset": "", "evaluator": "", "inferer": "",
        "load_old": 1,
        "output_dir": "$@bundle_root + '/output'",
        "gender": 0.0, "age": 0.1, "ventricular_vol": 0.2, "brain_vol": 0.4,
        "conditioning": "$torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]]).to(@device).unsqueeze(1)",
        "out_file": "$datetime.now().strftime('sample_%H%M%S_%d%m%Y') + '_' + str(@gender)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "autoencoder_def": {"_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": 3, "in_channels": 1,
                            "out_channels": 1, **ae},
        "network_def": "@autoencoder_def",
        "load_autoencoder_path": "$@model_dir + '/autoencoder.pt'",
        "load_autoencoder_func": "$@autoencoder_def.load_old_state_dict if bool(@load_old) else @autoencoder_def.load_state_dict",
        "load_autoencoder": "$@load_autoencoder_func(torch.load(@load_autoencoder_path))",
        "autoencoder": "$@autoencoder_def.to(@device)",
        "diffusion_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 3, **unet},
        "load_diffusion_path": "$@model_dir + '/model.pt'",
        "load_diffusion_func": "$@diffusion_def.load_old_state_dict if bool(@load_old) else @diffusion_def.load_state_dict",
        "load_diffusion": "$@load_diffusion_func(torch.load(@load_diffusion_path))",
        "diffusion": "$@diffusion_def.to(@device)",
        "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler", "_requires_": ["@load_diffusion", "@load_autoencoder"],
                      **ddim(0.0205)},
        "noise": f"$torch.randn({tuple(noise)}).to(@device)",
        "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=50)",
        "sampler": {"_target_": "scripts.sampler.Sampler", "_requires_": "@set_timesteps"},
        "sample": "$@sampler.sampling_fn(@noise, @autoencoder, @diffusion, @scheduler, @conditioning)",
        "saver": {"_target_": "SaveImage", "output_dir": "@output_dir", "output_postfix": "@out_file"},
        "run": "$@saver(@sample[0][0])",
    }
    return {"inference.json": inference}


# name -> (config files, AE params (MONAI names), UNet params (MONAI names), latent (C, spatial...), AE/UNet
#          weight file names, context tokens x dim or None, extra UNet input channels, expected sampling)
BRATS3D_AE = dict(channels=[8, 16, 32], num_res_blocks=2, norm_num_groups=8, norm_eps=1e-06,
                  attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
                  with_decoder_nonlocal_attn=False, include_fc=False)
BRATS3D_UNET = dict(channels=[16, 16, 32], attention_levels=[False, True, True], num_head_channels=[0, 8, 8],
                    num_res_blocks=2, norm_num_groups=8, include_fc=False, use_combined_linear=False)
BRATS2D_AE = dict(channels=[64, 128, 256], num_res_blocks=2, norm_num_groups=32, norm_eps=1e-06,
                  attention_levels=[False, False, False], with_encoder_nonlocal_attn=True,
                  with_decoder_nonlocal_attn=True, include_fc=False)
BRATS2D_UNET = dict(channels=[32, 64, 128, 256], attention_levels=[False, True, True, True],
                    num_head_channels=[0, 32, 32, 32], num_res_blocks=2, include_fc=False, use_combined_linear=False)
BRAIN_AE = dict(latent_channels=3, channels=[8, 16, 16, 16], num_res_blocks=2, norm_num_groups=8, norm_eps=1e-06,
                attention_levels=[False, False, False, False], with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False)
BRAIN_UNET = dict(in_channels=7, out_channels=3, channels=[16, 32, 48], num_res_blocks=2,
                  attention_levels=[False, True, True], norm_num_groups=8, norm_eps=1e-06, resblock_updown=True,
                  num_head_channels=[0, 32, 48], with_conditioning=True, transformer_num_layers=1,
                  cross_attention_dim=4, upcast_attention=True, use_flash_attention=False)

CASES = {
    "brats_mri_generative_diffusion_v1.0.9": dict(
        files=lambda: brats(3, 8, [8, 12, 8], BRATS3D_AE, BRATS3D_UNET, monai_core=False),
        ae=dict(BRATS3D_AE, spatial_dims=3, in_channels=1, out_channels=1, latent_channels=8),
        unet=dict(BRATS3D_UNET, spatial_dims=3, in_channels=8, out_channels=8),
        latent=[8, 8, 12, 8], weights=("model_autoencoder.pt", "model.pt"), context=None, beta_end=0.0195),
    "brats_mri_generative_diffusion_v1.1": dict(
        files=lambda: brats(3, 8, [8, 12, 8], BRATS3D_AE, BRATS3D_UNET, monai_core=True),
        ae=dict(BRATS3D_AE, spatial_dims=3, in_channels=1, out_channels=1, latent_channels=8),
        unet=dict(BRATS3D_UNET, spatial_dims=3, in_channels=8, out_channels=8),
        latent=[8, 8, 12, 8], weights=("model_autoencoder.pt", "model.pt"), context=None, beta_end=0.0195),
    "brats_mri_axial_slices_generative_diffusion_v1.1": dict(
        files=lambda: brats(2, 1, [64, 64], BRATS2D_AE, BRATS2D_UNET, monai_core=True),
        ae=dict(BRATS2D_AE, spatial_dims=2, in_channels=1, out_channels=1, latent_channels=1),
        unet=dict(BRATS2D_UNET, spatial_dims=2, in_channels=1, out_channels=1),
        latent=[1, 64, 64], weights=("model_autoencoder.pt", "model.pt"), context=None, beta_end=0.0195),
    "brain_image_synthesis_latent_diffusion_model": dict(
        files=lambda: brain(BRAIN_AE, BRAIN_UNET, (1, 3, 8, 8, 8)),
        ae=dict(BRAIN_AE, spatial_dims=3, in_channels=1, out_channels=1),
        unet=dict(BRAIN_UNET, spatial_dims=3),
        latent=[3, 8, 8, 8], weights=("autoencoder.pt", "model.pt"), context=(1, 4), beta_end=0.0205),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    manifest = []
    for name, c in CASES.items():
        d = os.path.join(args.out, name)
        os.makedirs(os.path.join(d, "configs"), exist_ok=True)
        os.makedirs(os.path.join(d, "models"), exist_ok=True)
        for fname, content in c["files"]().items():
            with open(os.path.join(d, "configs", fname), "w") as f:
                json.dump(content, f, indent=4)
        with open(os.path.join(d, "configs", "metadata.json"), "w") as f:
            json.dump({"version": "test", "monai_version": "1.6.1", "name": name}, f, indent=4)
        torch.manual_seed(SEED)
        ae = OldAEKL(**gen_names(c["ae"])).eval()
        unet = OldUNet(**gen_names(c["unet"])).eval()
        gen = torch.Generator().manual_seed(SEED + 1)
        perturb(ae, gen)
        perturb(unet, gen)
        torch.save(ae.state_dict(), os.path.join(d, "models", c["weights"][0]))
        torch.save(unet.state_dict(), os.path.join(d, "models", c["weights"][1]))
        z = torch.randn([1] + c["latent"], generator=gen)
        extra = c["unet"]["in_channels"] - c["latent"][0]
        x = torch.cat([z, torch.rand([1, extra] + c["latent"][1:], generator=gen)], 1) if extra else z.clone()
        t = torch.tensor([437], dtype=torch.int64)
        io = {"z": z, "x": x, "timesteps": t}
        kw = {}
        if c["context"]:
            io["context"] = kw["context"] = torch.rand([1, *c["context"]], generator=gen)
        with torch.no_grad():
            io["decoded"] = ae.decode_stage_2_outputs(z)
            io["unet_out"] = unet(x, timesteps=t, **kw)
        save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(args.out, f"{name}.io.safetensors"))
        manifest.append({"case": name, "dir": name, "io": f"{name}.io.safetensors", "latent": c["latent"],
                         "beta_end": c["beta_end"], "conditioned": bool(extra)})
        print(f"wrote {d}", file=sys.stderr)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
