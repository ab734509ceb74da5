"""MONAI's deterministic counterparts of the reference augmentations, for given parameters: Flip(spatial_axis=0),
Affine(scale, translate; bilinear, reflection), ShiftIntensity, AdjustContrast. The Rust test `data_loader` applies
medgen's transforms with the same parameters and compares.

Writes <out>/augment.safetensors (the input image and each output) and <out>/manifest.json (the parameters).
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from monai.transforms import AdjustContrast, Affine, Flip, ShiftIntensity

CASES = [
    {"name": "affine_shift_scale", "translate": [1.3, -0.7], "scale": [1.04, 0.96]},
    {"name": "affine_translate_only", "translate": [-2.0, 1.9], "scale": [1.0, 1.0]},
    {"name": "affine_small_scale", "translate": [0.25, 0.5], "scale": [0.99, 1.01]},
    {"name": "affine_reflect_edges", "translate": [1.99, -1.99], "scale": [0.95, 1.05]},
    {"name": "flip", "flip": True},
    {"name": "shift", "shift": 0.037},
    {"name": "gamma_low", "gamma": 0.97},
    {"name": "gamma_high", "gamma": 1.0299},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    # A PNG-like image: u8 / 255 with structure (a smooth blob and texture), shape (1, 160, 224).
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 160), torch.linspace(-1, 1, 224), indexing="ij")
    smooth = torch.exp(-((xx * 1.3) ** 2 + (yy * 1.1 + 0.2) ** 2) * 2.0)
    raw = (smooth * 200 + torch.rand((160, 224), generator=g) * 55).floor().clamp(0, 255)
    img = (raw / 255.0).unsqueeze(0).float()
    out = {"image": img}
    for c in CASES:
        x = img.clone()
        if c.get("flip"):
            x = Flip(spatial_axis=0)(x)
        if "translate" in c:
            x = Affine(translate_params=c["translate"], scale_params=c["scale"], mode="bilinear",
                       padding_mode="reflection", image_only=True)(x)
        if "shift" in c:
            x = ShiftIntensity(offset=c["shift"])(x)
        if "gamma" in c:
            x = AdjustContrast(gamma=c["gamma"])(x)
        out[c["name"]] = torch.as_tensor(x).float().contiguous()
    os.makedirs(args.out, exist_ok=True)
    save_file(out, os.path.join(args.out, "augment.safetensors"))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(CASES, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
