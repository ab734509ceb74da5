"""AutoencoderKL training-step parity fixtures: 5 steps of the reference stage-1 loop (reference-repo.md §3.5: the G step
with L1 + KL + perceptual (LPIPS squeeze) + adversarial, clip 1, Adam; then the D step with the least-squares patch
loss, clip 1, Adam) with MONAI 1.6.1 networks, AMP off, fp32, one thread. The posterior noise of each step is saved,
so the Rust side draws nothing. The LPIPS backbone is random (no ImageNet weights ship offline); its lin heads are the
lpips wheel's.
"""
import argparse
import json
import os

import lpips
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from fixtures_common import perturb

AEKL = dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16], latent_channels=3, num_res_blocks=1,
            attention_levels=[False, False], norm_num_groups=4, with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False)
DISC = dict(spatial_dims=2, num_layers_d=2, channels=8, in_channels=1, out_channels=1)
WEIGHTS = dict(perceptual_weight=0.2, kl_weight=1e-3, adv_weight=0.05)
LR_G, LR_D, STEPS = 1e-3, 5e-3, 5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(31)
    torch.manual_seed(30)
    model = AutoencoderKL(**AEKL)
    perturb(model, gen)
    disc = PatchDiscriminator(**DISC)
    torch.manual_seed(32)
    lp = lpips.LPIPS(pretrained=True, net="squeeze", version="0.1", pnet_rand=True, verbose=False).eval()
    for p in lp.parameters():
        p.requires_grad = False
    torch.save(model.state_dict(), os.path.join(args.out, "aekl_init.pt"))
    torch.save(disc.state_dict(), os.path.join(args.out, "disc_init.pt"))
    torch.save(lp.state_dict(), os.path.join(args.out, "lpips_squeeze.pt"))
    adv = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
    opt_g = torch.optim.Adam(model.parameters(), lr=LR_G)
    opt_d = torch.optim.Adam(disc.parameters(), lr=LR_D)
    model.train()
    disc.train()
    draws, losses = {}, []
    for s in range(STEPS):
        images = torch.rand((2, 1, 32, 32), generator=gen)
        draws[f"images.{s}"] = images
        opt_g.zero_grad(set_to_none=True)
        z_mu, z_sigma = model.encode(images)
        eps = torch.randn(z_mu.shape, generator=gen)
        draws[f"eps.{s}"] = eps
        reconstruction = model.decode(z_mu + eps * z_sigma)
        l1 = F.l1_loss(reconstruction.float(), images.float())
        p_loss = torch.mean(lp(reconstruction.float(), images.float(), normalize=False))
        kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=[1, 2, 3])
        kl = torch.sum(kl) / kl.shape[0]
        adversarial = s >= 1  # the adv_start switch, on from the second step
        if adversarial:
            logits_fake = disc(reconstruction.contiguous().float())[-1]
            g_adv = adv(logits_fake, target_is_real=True, for_discriminator=False)
        else:
            g_adv = torch.tensor([0.0])
        loss = l1 + WEIGHTS["kl_weight"] * kl + WEIGHTS["perceptual_weight"] * p_loss + \
            (WEIGHTS["adv_weight"] if adversarial else 0.0) * g_adv
        loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1)
        opt_g.step()
        d_loss = 0.0
        if adversarial:
            opt_d.zero_grad(set_to_none=True)
            logits_fake = disc(reconstruction.contiguous().detach())[-1]
            loss_d_fake = adv(logits_fake, target_is_real=False, for_discriminator=True)
            logits_real = disc(images.contiguous().detach())[-1]
            loss_d_real = adv(logits_real, target_is_real=True, for_discriminator=True)
            dl = WEIGHTS["adv_weight"] * (loss_d_fake + loss_d_real) * 0.5
            dl.backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), 1)
            opt_d.step()
            d_loss = dl.item()
        losses.append({"loss": loss.item(), "l1": l1.item(), "p_loss": p_loss.item(), "kl": kl.item(),
                       "g_adv": g_adv.item(), "d_loss": d_loss, "adversarial": adversarial})
    torch.save(model.state_dict(), os.path.join(args.out, "aekl_after.pt"))
    torch.save(disc.state_dict(), os.path.join(args.out, "disc_after.pt"))
    save_file({k: v.contiguous() for k, v in draws.items()}, os.path.join(args.out, "draws.safetensors"))
    lin = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "squeeze.pth")
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump({"aekl": AEKL, "discriminator": DISC, "weights": WEIGHTS, "lr_g": LR_G, "lr_d": LR_D,
                   "steps": STEPS, "losses": losses, "lin_weights": lin,
                   "aekl_param_order": [n for n, _ in model.named_parameters()],
                   "disc_param_order": [n for n, _ in disc.named_parameters()]}, f, indent=1)
    print(f"wrote {args.out}: {[round(l['loss'], 6) for l in losses]}")


if __name__ == "__main__":
    main()
