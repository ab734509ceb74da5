"""Training-step parity fixtures: 5 optimiser steps of the LDM objective and of the ControlNet objective
(reference-repo.md §3.6-3.7: v-prediction MSE, AdamW, UNet frozen for the ControlNet) with MONAI 1.6.1, from saved
initial weights and saved per-step draws (latents, noise, timesteps, contexts). The Rust test `train_step` replays
them. fp32 and one thread; the LDM also under CPU autocast (bf16, and fp16 with a GradScaler).
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from fixtures_common import perturb

UNET = dict(spatial_dims=2, in_channels=3, out_channels=3, num_res_blocks=1, channels=[16, 32],
            attention_levels=[False, True], norm_num_groups=8, num_head_channels=[0, 16], with_conditioning=True,
            cross_attention_dim=8)
CONTROLNET = dict({k: v for k, v in UNET.items() if k != "out_channels"}, conditioning_embedding_num_channels=[8, 16])
SCHEDULER = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205,
                 prediction_type="v_prediction")
LR, STEPS, BATCH = 1e-3, 5, 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(21)
    torch.manual_seed(20)
    unet = DiffusionModelUNet(**UNET)
    perturb(unet, gen)
    controlnet = ControlNet(**CONTROLNET)
    perturb(controlnet, gen)
    controlnet.load_state_dict(unet.state_dict(), strict=False)
    torch.save(unet.state_dict(), os.path.join(args.out, "unet_init.pt"))
    torch.save(controlnet.state_dict(), os.path.join(args.out, "controlnet_init.pt"))
    scheduler = DDPMScheduler(**SCHEDULER)
    draws = {}
    for s in range(STEPS):
        draws[f"latent.{s}"] = torch.randn((BATCH, 3, 8, 8), generator=gen)
        draws[f"noise.{s}"] = torch.randn((BATCH, 3, 8, 8), generator=gen)
        draws[f"timesteps.{s}"] = torch.randint(0, 1000, (BATCH,), generator=gen)
        draws[f"context.{s}"] = torch.randn((BATCH, 4, 8), generator=gen)
        draws[f"cond.{s}"] = torch.rand((BATCH, 1, 16, 16), generator=gen)
    losses = {"ldm": [], "controlnet": []}

    def loss_of(model_out, s):
        target = scheduler.get_velocity(draws[f"latent.{s}"], draws[f"noise.{s}"], draws[f"timesteps.{s}"])
        return F.mse_loss(model_out.float(), target.float())

    # LDM: the UNet trains, in fp32, then again from the same start under CPU autocast: bfloat16, and float16 with
    # the reference's GradScaler (PyTorch defaults).
    def train_ldm(precision):
        unet.load_state_dict(torch.load(os.path.join(args.out, "unet_init.pt")))
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=LR)
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
        out = []
        for s in range(STEPS):
            opt.zero_grad(set_to_none=True)
            t = draws[f"timesteps.{s}"]
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                noisy = scheduler.add_noise(original_samples=draws[f"latent.{s}"], noise=draws[f"noise.{s}"],
                                            timesteps=t)
                loss = loss_of(unet(x=noisy, timesteps=t, context=draws[f"context.{s}"]), s)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            out.append(loss.item())
        suffix = "" if precision == "fp32" else f"_{precision}"
        torch.save(unet.state_dict(), os.path.join(args.out, f"unet_after{suffix}.pt"))
        return out

    for precision in ("bf16", "fp16", "fp32"):
        losses["ldm" if precision == "fp32" else f"ldm_{precision}"] = train_ldm(precision)

    # ControlNet: from the initial UNet, frozen; the ControlNet trains.
    unet.load_state_dict(torch.load(os.path.join(args.out, "unet_init.pt")))
    unet.eval()
    for p in unet.parameters():
        p.requires_grad = False
    controlnet.train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=LR)
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        t = draws[f"timesteps.{s}"]
        ctx = draws[f"context.{s}"]
        noisy = scheduler.add_noise(original_samples=draws[f"latent.{s}"], noise=draws[f"noise.{s}"], timesteps=t)
        down, mid = controlnet(x=noisy, timesteps=t, context=ctx, controlnet_cond=draws[f"cond.{s}"])
        out = unet(x=noisy, timesteps=t, context=ctx, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid)
        loss = loss_of(out, s)
        loss.backward()
        opt.step()
        losses["controlnet"].append(loss.item())
    torch.save(controlnet.state_dict(), os.path.join(args.out, "controlnet_after.pt"))
    save_file({k: v.contiguous() for k, v in draws.items()}, os.path.join(args.out, "draws.safetensors"))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump({"unet": UNET, "controlnet": CONTROLNET, "scheduler": SCHEDULER, "lr": LR, "steps": STEPS,
                   "losses": losses}, f, indent=1)
    print(f"wrote {args.out}: losses {losses}")


if __name__ == "__main__":
    main()
