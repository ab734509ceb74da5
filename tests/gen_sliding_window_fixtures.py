"""Sliding-window decoding fixtures, from MONAI 1.6.1's `SlidingWindowInferer`.

An AutoencoderKL (2-D and 3-D, random weights perturbed as in the parity fixtures) decodes latents window by window
with several inferer settings: constant and Gaussian blending, overlaps, `sw_batch_size` mixing the windows of two
batch elements, a latent smaller than the window along an axis (MONAI pads it and crops the output back), a window
as large as the latent. For each case:
  <out>/<case>/state_dict.pt    the autoencoder (torch.save)
  <out>/<case>/config.json      its medgen config and the inferer's settings
  <out>/<case>/io.safetensors   the latent, the windowed decode and the whole-latent decode
and <out>/manifest.json. The Rust test `sliding_window` compares medgen's windowed decode with MONAI's.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

from fixtures_common import perturb

from monai.inferers import SlidingWindowInferer
from monai.networks.nets import AutoencoderKL

SEED = 77

AE_3D = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16, 16], latent_channels=3,
             num_res_blocks=1, attention_levels=[False, False, False], norm_num_groups=4,
             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
AE_2D = dict(AE_3D, spatial_dims=2)

# name -> (autoencoder params, latent shape, inferer settings)
CASES = {
    "3d_constant": (AE_3D, (1, 3, 12, 10, 8), dict(roi_size=[6, 6, 4], overlap=0.25, mode="constant")),
    "3d_gaussian": (AE_3D, (1, 3, 12, 10, 8), dict(roi_size=[6, 6, 4], overlap=0.5, mode="gaussian")),
    "3d_gaussian_sigma_batches": (AE_3D, (2, 3, 9, 8, 7), dict(roi_size=[4, 4, 4], overlap=[0.25, 0.5, 0.0],
                                                                mode="gaussian", sigma_scale=[0.125, 0.25, 0.5],
                                                                sw_batch_size=3)),
    "3d_padded": (AE_3D, (1, 3, 10, 3, 6), dict(roi_size=[4, 5, 4], overlap=0.25, mode="gaussian", sw_batch_size=2)),
    "3d_whole": (AE_3D, (1, 3, 6, 6, 4), dict(roi_size=[6, 6, 4], overlap=0.25, mode="constant")),
    "3d_fallback_axis": (AE_3D, (1, 3, 8, 6, 5), dict(roi_size=[4, -1, 0], overlap=0.25, mode="gaussian")),
    "2d_gaussian": (AE_2D, (2, 3, 20, 14), dict(roi_size=[8, 8], overlap=0.25, mode="gaussian", sw_batch_size=4)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    manifest = []
    for name, (params, latent_shape, sw) in CASES.items():
        torch.manual_seed(SEED)
        ae = AutoencoderKL(**params)
        ae.eval()
        gen = torch.Generator().manual_seed(SEED + 1)
        perturb(ae, gen)
        z = torch.randn(latent_shape, generator=gen)
        inferer = SlidingWindowInferer(**sw)
        with torch.no_grad():
            windowed = inferer(z, ae.decode_stage_2_outputs)
            whole = ae.decode_stage_2_outputs(z)
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        torch.save(ae.state_dict(), os.path.join(d, "state_dict.pt"))
        save_file({"z": z.contiguous(), "windowed": windowed.as_tensor().contiguous() if hasattr(windowed, "as_tensor")
                   else windowed.contiguous(), "whole": whole.contiguous()}, os.path.join(d, "io.safetensors"))
        cfg = {"autoencoder": params, "sliding_window": {
            "roi_size": sw["roi_size"],
            "overlap": sw["overlap"] if isinstance(sw["overlap"], list) else [sw["overlap"]],
            "mode": sw["mode"],
            "sw_batch_size": sw.get("sw_batch_size", 1),
            "sigma_scale": sw.get("sigma_scale", [0.125]) if isinstance(sw.get("sigma_scale", [0.125]), list)
            else [sw["sigma_scale"]],
        }}
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        manifest.append({"case": name, "dir": name, "windowed_shape": list(windowed.shape)})
        print(f"wrote {d}: latent {list(latent_shape)} -> {list(windowed.shape)}", file=sys.stderr)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
