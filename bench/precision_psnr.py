"""bf16 against fp32 sampling at the reference configs with random weights (issue 16): builds the reference-size
AutoencoderKL, UNet and ControlNet (monai-generative, seeded random weights; the zero-initialised output convolutions
given small random values so that every network shapes the image), writes them and a random text context, then runs
`medgen sample flair-to-t1w` on the same FLAIR slices and seeds in fp32 and in bf16 and prints the PSNR of the PNGs.

    .venv/bin/python bench/precision_psnr.py --medgen target/release/medgen --list data/png/test.tsv --out DIR
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import monai_compat  # noqa: F401,E402  (before any `generative` import)
from generative.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REF = {"aekl": "configs/aekl_v0.json", "ldm": "configs/ldm_v0.json", "controlnet": "configs/controlnet_v0.json"}


def params(path, key):
    return json.load(open(path))[key]["params"]


def save(model, path):
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--medgen", default="target/release/medgen")
    ap.add_argument("--list", default="data/png/test.tsv")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    w = {k: os.path.join(a.out, k + ".safetensors") for k in REF}
    save(AutoencoderKL(**params(REF["aekl"], "stage1")), w["aekl"])
    unet = DiffusionModelUNet(**params(REF["ldm"], "ldm"))
    save(unet, w["ldm"])
    cn = ControlNet(**params(REF["controlnet"], "controlnet"))
    save(cn, w["controlnet"])
    ctx = torch.randn(1, 77, 1024)
    save_file({"context": ctx, "uncond_context": torch.randn(1, 77, 1024) * 0.5, "null_context": torch.zeros(1, 77, 1024)},
              os.path.join(a.out, "context.safetensors"))
    outs = {}
    for precision in ("fp32", "bf16"):
        o = os.path.join(a.out, precision)
        subprocess.run([a.medgen, "sample", "flair-to-t1w", "--device", "cpu", "--precision", precision,
                        "--stage1-config", REF["aekl"], "--stage1-weights", w["aekl"],
                        "--ldm-config", REF["ldm"], "--ldm-weights", w["ldm"],
                        "--controlnet-config", REF["controlnet"], "--controlnet-weights", w["controlnet"],
                        "--context", os.path.join(a.out, "context.safetensors"), "--steps", str(a.steps),
                        "--input", a.list, "--limit", str(a.n), "--batch-size", str(a.n), "--output", o], check=True)
        outs[precision] = o
    for f in sorted(os.listdir(outs["fp32"])):
        if not f.endswith("_T1w.png"):
            continue
        x = np.asarray(Image.open(os.path.join(outs["fp32"], f))).astype(float) / 255
        y = np.asarray(Image.open(os.path.join(outs["bf16"], f))).astype(float) / 255
        mse = ((x - y) ** 2).mean()
        print(f"{f}: bf16 vs fp32 PSNR {10 * np.log10(1 / mse) if mse else float('inf'):.2f} dB, "
              f"max {np.abs(x - y).max() * 255:.0f} levels, image range {x.min():.2f}-{x.max():.2f}")


if __name__ == "__main__":
    main()
