"""End-to-end sampling fixtures: a small random AutoencoderKL + DiffusionModelUNet (+ ControlNet), sampled
with the loops of the reference scripts `sample_t1w.py` / `sample_flair_to_t1w.py` (DDIM, v-prediction,
classifier-free guidance on the batched [uncond, cond] pair, latent / scale_factor decoded), from a fixed seed.

Per case and library, <out>/<case>-<lib>/ holds aekl.pt, unet.pt[, controlnet.pt], config.json (the model
configs, the scheduler config in medgen's names and the sampling settings) and io.safetensors (prompt
embeddings, control image, the initial noise, the final latent and the decoded image). The Rust test
`sampling` runs medgen's loop on them.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

from fixtures_common import perturb

import monai
import monai_compat  # noqa: F401  (before any `generative` import)

from generative.networks.nets import AutoencoderKL as OldAEKL
from generative.networks.nets import ControlNet as OldControlNet
from generative.networks.nets import DiffusionModelUNet as OldUNet
from generative.networks.schedulers import DDIMScheduler as OldDDIM
from generative.networks.schedulers import PNDMScheduler as OldPNDM
from monai.networks.nets import AutoencoderKL as NewAEKL
from monai.networks.nets import ControlNet as NewControlNet
from monai.networks.nets import DiffusionModelUNet as NewUNet
from monai.networks.schedulers import DDIMScheduler as NewDDIM
from monai.networks.schedulers import PNDMScheduler as NewPNDM

SEED = 77
NOISE_SEED = 3
SCALE_FACTOR = 0.3

AEKL = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16], latent_channels=3, num_res_blocks=1,
            attention_levels=[False, False], norm_num_groups=4, with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=True)
UNET = dict(spatial_dims=2, in_channels=3, out_channels=3, num_res_blocks=1, channels=[16, 32],
            attention_levels=[False, True], norm_num_groups=8, num_head_channels=[0, 16], with_conditioning=True,
            cross_attention_dim=16)
UNET_UNCOND = dict(UNET, with_conditioning=False, cross_attention_dim=None, num_head_channels=[0, 8])
del UNET_UNCOND["cross_attention_dim"]
CONTROLNET = {k: v for k, v in UNET.items() if k != "out_channels"}
CONTROLNET.update(conditioning_embedding_in_channels=1, conditioning_embedding_num_channels=[8, 16])
# The reference scripts' scheduler (ldm_v0.yaml's, with clip_sample=False).
DDIM = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0205, schedule="scaled_linear_beta",
            prediction_type="v_prediction", clip_sample=False)
PNDM = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0205, schedule="scaled_linear_beta",
            prediction_type="v_prediction", skip_prk_steps=True)

# name -> (unet params, with controlnet, scheduler kind, steps, guidance scale)
CASES = {
    "ldm_cfg": (UNET, False, "ddim", 20, 7.0),
    "controlnet_cfg": (UNET, True, "ddim", 20, 7.0),
    "ldm_uncond_pndm": (UNET_UNCOND, False, "pndm", 10, None),
}
LATENT = (1, 3, 16, 16)
IMAGE = (32, 32)
TOKENS = 7


def ctor(lib, params):
    p = dict(params)
    if lib == "generative":
        p["num_channels"] = p.pop("channels")
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    manifest = []
    for name, (unet_params, with_cn, kind, steps, guidance) in CASES.items():
        for lib in ("generative", "monai"):
            old = lib == "generative"
            torch.manual_seed(SEED)
            gen = torch.Generator().manual_seed(SEED + 1)
            aekl = (OldAEKL if old else NewAEKL)(**ctor(lib, AEKL))
            unet = (OldUNet if old else NewUNet)(**ctor(lib, unet_params))
            models = {"aekl.pt": aekl, "unet.pt": unet}
            cn = None
            if with_cn:
                cn = (OldControlNet if old else NewControlNet)(**ctor(lib, CONTROLNET))
                models["controlnet.pt"] = cn
            for m in models.values():
                perturb(m, gen)
                m.eval()
            io = {}
            cond_embeds = None
            if unet_params.get("with_conditioning"):
                uncond = torch.randn((1, TOKENS, 16), generator=gen)
                cond = torch.randn((1, TOKENS, 16), generator=gen)
                io["uncond_context"], io["context"] = uncond, cond
                cond_embeds = torch.cat([uncond, cond])
            flair = None
            if with_cn:
                flair = torch.rand((1, 1, *IMAGE), generator=gen)
                io["controlnet_cond"] = flair
            if kind == "ddim":
                scheduler = (OldDDIM if old else NewDDIM)(**DDIM)
                sched_cfg = dict(DDIM)
                if old:
                    # monai-generative spaces the steps as arange(n) * (T // n); MONAI 1.6 uses a linspace.
                    sched_cfg["timestep_spacing"] = "leading"
            else:
                scheduler = (OldPNDM if old else NewPNDM)(**PNDM)
                sched_cfg = dict(PNDM)
            scheduler.set_timesteps(steps)
            io["timesteps"] = torch.as_tensor(scheduler.timesteps).to(torch.int64)

            # The reference loop (sample_t1w.py / sample_flair_to_t1w.py), verbatim in substance.
            torch.manual_seed(NOISE_SEED)
            noise = torch.randn(LATENT)
            io["noise"] = noise.clone()
            with torch.no_grad():
                for t in scheduler.timesteps:
                    timesteps = torch.Tensor((t,)).long()
                    if guidance is None:
                        noise_input, ctx, cn_cond = noise, cond_embeds, flair
                    else:
                        noise_input, ctx = torch.cat([noise] * 2), cond_embeds
                        cn_cond = torch.cat([flair] * 2) if flair is not None else None
                    if cn is not None:
                        down, mid = cn(x=noise_input, timesteps=timesteps, context=ctx, controlnet_cond=cn_cond,
                                       conditioning_scale=1.0)
                        model_output = unet(x=noise_input, timesteps=timesteps, context=ctx,
                                            down_block_additional_residuals=down, mid_block_additional_residual=mid)
                    else:
                        model_output = unet(x=noise_input, timesteps=timesteps, context=ctx)
                    if guidance is not None:
                        noise_pred_uncond, noise_pred_text = model_output.chunk(2)
                        model_output = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
                    noise, _ = scheduler.step(model_output, t, noise)
                io["latent"] = noise
                io["image"] = aekl.decode_stage_2_outputs(noise / SCALE_FACTOR)
            d = os.path.join(args.out, f"{name}-{lib}")
            os.makedirs(d, exist_ok=True)
            for fname, m in models.items():
                torch.save(m.state_dict(), os.path.join(d, fname))
            save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
            cfg = {"stage1": {"params": ctor(lib, AEKL)}, "ldm": {"params": ctor(lib, unet_params),
                                                                   "scheduler": sched_cfg}}
            if with_cn:
                cfg["controlnet"] = {"params": ctor(lib, CONTROLNET)}
            cfg["sampling"] = {"scheduler": kind, "num_inference_steps": steps, "guidance_scale": guidance,
                               "scale_factor": SCALE_FACTOR, "seed": NOISE_SEED, "latent_shape": list(LATENT)}
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f, indent=1)
            manifest.append({"case": name, "lib": lib, "dir": f"{name}-{lib}",
                             "versions": {"torch": torch.__version__, "monai": monai.__version__}})
            print(f"wrote {d}", file=sys.stderr)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
