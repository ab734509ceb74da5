"""Parity fixtures for the image-quality metrics: SSIM and MS-SSIM (MONAI 1.6.1 `monai.metrics` and monai-generative
0.2.3 `generative.metrics`, which the reference used), PSNR / MAE / MSE (MONAI), the sample-diversity MS-SSIM
(the reference's explicit loop over ordered pairs) and numpy's mean / population std.

  <out>/manifest.json    the cases: constructor arguments (the libraries' own names), expected errors
  <out>/tensors.pt       torch.save of one flat dict: "<case>/<what>" -> tensor
The Rust test `parity_metrics` compares against them.

The images are synthetic and deterministic (no demo data is read): uniform noise, noisy copies of it (so that
MS-SSIM is not ~0), anti-correlated copies (negative contrast, clamped by the relu) and smooth "brain-like" blobs
quantised to k/255 as the reference's PNGs are.
"""
import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import monai_compat  # noqa: F401  (before any `generative` import)

import numpy as np
import torch

from monai.metrics import MAEMetric, MSEMetric, PSNRMetric
from monai.metrics import MultiScaleSSIMMetric as NewMsSsim
from monai.metrics import SSIMMetric as NewSsim
from generative.metrics import MultiScaleSSIMMetric as OldMsSsim
from generative.metrics import SSIMMetric as OldSsim

SEED = 2024


def blobs(gen, n, h, w, channels=1):
    """Smooth images in [0, 1] that look vaguely like brain slices: an elliptical head with a darker rim, a few
    Gaussian blobs inside and faint noise, quantised to k/255."""
    yy = torch.linspace(-1, 1, h).view(h, 1)
    xx = torch.linspace(-1, 1, w).view(1, w)
    out = torch.zeros(n, channels, h, w)
    for i in range(n):
        for c in range(channels):
            r = torch.rand(12, generator=gen)
            ay, ax = 0.75 + 0.2 * r[0], 0.7 + 0.25 * r[1]
            ell = (yy / ay) ** 2 + (xx / ax) ** 2
            img = torch.sigmoid((1 - ell) * 25) * (0.35 + 0.2 * r[2])
            img = img + 0.25 * torch.exp(-((ell - 0.85) ** 2) / 0.005)
            for _ in range(4 + int(r[3] * 4)):
                p = torch.rand(4, generator=gen)
                cy, cx = (p[0] - 0.5) * 1.2 * ay, (p[1] - 0.5) * 1.2 * ax
                s = 0.05 + 0.25 * p[2]
                img = img + (p[3] - 0.3) * 0.5 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            img = img + 0.02 * torch.randn(h, w, generator=gen)
            out[i, c] = img
    return (out.clamp(0, 1) * 255).floor() / 255


def pair(gen, kind, shape, scale=1.0, offset=0.0):
    b, c, h, w = shape
    if kind == "random":
        x, y = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    elif kind == "correlated":
        x = torch.rand(shape, generator=gen)
        y = (x + 0.1 * torch.randn(shape, generator=gen)).clamp(0, 1)
    elif kind == "anticorrelated":
        x = torch.rand(shape, generator=gen)
        y = 1 - x
    elif kind == "identical":
        x = blobs(gen, b, h, w, c)
        y = x.clone()
    elif kind == "blobs":
        x = blobs(gen, b, h, w, c)
        # A "reconstruction": slightly blurred, noisy, quantised.
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        blur = torch.nn.functional.conv2d(x.reshape(b * c, 1, h, w), k.view(1, 1, 3, 3), padding=1).view(shape)
        y = ((blur + 0.02 * torch.randn(shape, generator=gen)).clamp(0, 1) * 255).floor() / 255
    else:
        raise ValueError(kind)
    return x * scale + offset, y * scale + offset


# name -> (images, shape, scale, offset, dtype, constructor arguments in MONAI MultiScaleSSIMMetric names).
# `kernel_size` is `win_size` for MONAI's SSIMMetric; generative's SSIMMetric calls it `kernel_size`.
CASES = {
    "random_160x224_k7": ("random", (3, 1, 160, 224), 1.0, 0.0, torch.float32, dict(kernel_size=7)),
    "correlated_160x224_k7": ("correlated", (3, 1, 160, 224), 1.0, 0.0, torch.float32, dict(kernel_size=7)),
    "blobs_160x224_k7": ("blobs", (4, 1, 160, 224), 1.0, 0.0, torch.float32, dict(kernel_size=7)),
    "blobs_176x240_k11": ("blobs", (2, 1, 176, 240), 1.0, 0.0, torch.float32, dict(kernel_size=11)),
    "correlated_192x192_k11": ("correlated", (2, 1, 192, 192), 1.0, 0.0, torch.float32, dict()),
    "anticorrelated_160x224_k7": ("anticorrelated", (2, 1, 160, 224), 1.0, 0.0, torch.float32, dict(kernel_size=7)),
    "identical_160x224_k7": ("identical", (2, 1, 160, 224), 1.0, 0.0, torch.float32, dict(kernel_size=7)),
    "odd_131x197_k7": ("correlated", (2, 1, 131, 197), 1.0, 0.0, torch.float32, dict(kernel_size=7)),
    "channels3_128x144_k7": ("blobs", (2, 3, 128, 144), 1.0, 0.0, torch.float32, dict(kernel_size=7)),
    "range255_160x224_k7": ("blobs", (2, 1, 160, 224), 255.0, 0.0, torch.float32,
                            dict(kernel_size=7, data_range=255.0)),
    "range2_signed_160x224_k7": ("correlated", (2, 1, 160, 224), 2.0, -1.0, torch.float32,
                                 dict(kernel_size=7, data_range=2.0)),
    "uniform_kernel_160x224_k7": ("blobs", (2, 1, 160, 224), 1.0, 0.0, torch.float32,
                                  dict(kernel_size=7, kernel_type="uniform")),
    "params_k5x7_sigma1x2": ("correlated", (2, 1, 144, 160), 1.0, 0.0, torch.float32,
                             dict(kernel_size=(5, 7), kernel_sigma=(1.0, 2.0), k1=0.02, k2=0.05)),
    "even_kernel_k4": ("blobs", (2, 1, 96, 112), 1.0, 0.0, torch.float32, dict(kernel_size=4, kernel_sigma=0.8)),
    "weights3_64x80_k7": ("correlated", (3, 1, 64, 80), 1.0, 0.0, torch.float32,
                          dict(kernel_size=7, weights=(0.2, 0.3, 0.5))),
    "weights4_96x96_k7": ("blobs", (2, 1, 96, 96), 1.0, 0.0, torch.float32,
                          dict(kernel_size=7, weights=(0.1, 0.2, 0.3, 0.4))),
    "float64_160x224_k7": ("blobs", (2, 1, 160, 224), 1.0, 0.0, torch.float64, dict(kernel_size=7)),
    "batch1_160x224_k7": ("blobs", (1, 1, 160, 224), 1.0, 0.0, torch.float32, dict(kernel_size=7)),
}

# MS-SSIM inputs that the size check rejects (SSIM still runs on them).
SIZE_ERRORS = {
    # The reference's images with MONAI's default kernel: 160 // 16 = 10 <= 11 - 1.
    "size_error_160x224_k11": ((1, 1, 160, 224), dict()),
    "size_error_width_192x95_k7": ((1, 1, 192, 95), dict(kernel_size=7)),
    "size_error_weights3_24x64_k7": ((1, 1, 24, 64), dict(kernel_size=7, weights=(0.2, 0.3, 0.5))),
}

# PSNR max_val per regression case (MONAI's PSNRMetric has no default).
REGRESSION = {
    "blobs_160x224_k7": 1.0,
    "correlated_160x224_k7": 1.0,
    "channels3_128x144_k7": 1.0,
    "range255_160x224_k7": 255.0,
    "range2_signed_160x224_k7": 2.0,
    "odd_131x197_k7": 0.7,
    "float64_160x224_k7": 1.0,
}

# Diversity sets: name -> (images, shape, MS-SSIM arguments).
DIVERSITY = {
    "diversity_blobs_12x160x224_k7": ("blobs", (12, 1, 160, 224), dict(kernel_size=7)),
    "diversity_noisy_7x2x128x144_k5": ("noisy", (7, 2, 128, 144), dict(kernel_size=5, data_range=1.0)),
}


def monai_ssim_args(params):
    p = dict(params)
    p.pop("weights", None)
    if "kernel_size" in p:
        p["win_size"] = p.pop("kernel_size")
    return p


def ms_ssim_both(params, x, y):
    new = NewMsSsim(spatial_dims=2, **params)(x, y)
    old = OldMsSsim(spatial_dims=2, **params)(x, y)
    return new, old


def ssim_cases(gen, tensors, manifest):
    for name, (kind, shape, scale, offset, dtype, params) in CASES.items():
        x, y = pair(gen, kind, shape, scale, offset)
        x, y = x.to(dtype), y.to(dtype)
        tensors[f"{name}/x"], tensors[f"{name}/y"] = x, y
        sp = {k: v for k, v in params.items() if k != "weights"}
        tensors[f"{name}/ssim.monai"] = NewSsim(spatial_dims=2, **monai_ssim_args(params))(x, y)
        tensors[f"{name}/ssim.generative"] = OldSsim(spatial_dims=2, **sp)(x, y)
        new, old = ms_ssim_both(params, x, y)
        tensors[f"{name}/ms_ssim.monai"], tensors[f"{name}/ms_ssim.generative"] = new, old
        # The libraries agree with each other (same code); a difference would need a choice on the Rust side.
        assert torch.equal(new, old), name
        assert torch.equal(tensors[f"{name}/ssim.monai"], tensors[f"{name}/ssim.generative"]), name
        entry = {"name": name, "kind": "pair", "params": params, "shape": list(shape), "dtype": str(dtype)}
        if name in REGRESSION:
            max_val = REGRESSION[name]
            tensors[f"{name}/psnr"] = PSNRMetric(max_val=max_val)(x, y)
            tensors[f"{name}/mae"] = MAEMetric()(x, y)
            tensors[f"{name}/mse"] = MSEMetric()(x, y)
            entry["psnr_max_val"] = max_val
        manifest.append(entry)
        print(f"{name:34} ms_ssim {new.flatten().tolist()}", file=sys.stderr)


def size_error_cases(gen, tensors, manifest):
    for name, (shape, params) in SIZE_ERRORS.items():
        x, y = pair(gen, "correlated", shape)
        tensors[f"{name}/x"], tensors[f"{name}/y"] = x, y
        messages = []
        for cls in (NewMsSsim, OldMsSsim):
            try:
                cls(spatial_dims=2, **params)(x, y)
            except ValueError as e:
                messages.append(str(e))
            else:
                raise AssertionError(f"{name}: {cls} accepted {shape}")
        sp = {k: v for k, v in params.items() if k != "weights"}
        tensors[f"{name}/ssim.generative"] = OldSsim(spatial_dims=2, **sp)(x, y)
        manifest.append({"name": name, "kind": "size_error", "params": params, "shape": list(shape),
                         "monai_error": messages[0], "generative_error": messages[1]})


# Volumes (spatial_dims=3): name -> (images, shape, constructor arguments). MONAI's 3-D window (the 2-D product
# repeated along the depth and multiplied by the depth Gaussian), conv3d and avg_pool3d.
VOLUME_CASES = {
    "vol_correlated_2x1x48x40x36_k7_w3": ("correlated", (2, 1, 48, 40, 36),
                                          dict(spatial_dims=3, kernel_size=7, weights=(0.2, 0.3, 0.5))),
    "vol_smooth_1x2x64x64x64_k3_sigmas": ("smooth", (1, 2, 64, 64, 64),
                                          dict(spatial_dims=3, kernel_size=3, kernel_sigma=(1.5, 1.0, 0.8))),
    "vol_uniform_2x1x40x48x24_k573_w2": ("correlated", (2, 1, 40, 48, 24),
                                         dict(spatial_dims=3, kernel_type="uniform", kernel_size=(5, 7, 3),
                                              weights=(0.5, 0.5))),
    "vol_anticorrelated_1x1x32x32x32_k5_w2": ("anticorrelated", (1, 1, 32, 32, 32),
                                              dict(spatial_dims=3, kernel_size=5, weights=(0.4, 0.6))),
}


def volume_pair(gen, kind, shape):
    x = torch.rand(shape, generator=gen)
    if kind == "smooth":
        x = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
        y = (x + 0.05 * torch.randn(shape, generator=gen)).clamp(0, 1)
    elif kind == "correlated":
        y = (x + 0.1 * torch.randn(shape, generator=gen)).clamp(0, 1)
    elif kind == "anticorrelated":
        y = 1 - x
    else:
        raise ValueError(kind)
    return x, y


def volume_cases(gen, tensors, manifest):
    for name, (kind, shape, params) in VOLUME_CASES.items():
        x, y = volume_pair(gen, kind, shape)
        tensors[f"{name}/x"], tensors[f"{name}/y"] = x, y
        sp = {k: v for k, v in params.items() if k != "weights"}
        tensors[f"{name}/ssim.monai"] = NewSsim(**monai_ssim_args(params))(x, y)
        tensors[f"{name}/ssim.generative"] = OldSsim(**sp)(x, y)
        new, old = NewMsSsim(**params)(x, y), OldMsSsim(**params)(x, y)
        tensors[f"{name}/ms_ssim.monai"], tensors[f"{name}/ms_ssim.generative"] = new, old
        assert torch.equal(new, old), name
        manifest.append({"name": name, "kind": "pair", "params": params, "shape": list(shape),
                         "dtype": str(x.dtype)})
        print(f"{name:34} ms_ssim {new.flatten().tolist()}", file=sys.stderr)


def diversity_images(gen, kind, shape):
    n, c, h, w = shape
    if kind == "blobs":
        return blobs(gen, n, h, w, c)
    # A shared base plus per-image noise of growing strength: a spread of MS-SSIM values, none near 0.
    base = blobs(gen, 1, h, w, c)
    strengths = torch.linspace(0.02, 0.3, n).view(n, 1, 1, 1)
    return (base + strengths * torch.randn(shape, generator=gen)).clamp(0, 1)


def diversity_cases(gen, tensors, manifest):
    for name, (kind, shape, params) in DIVERSITY.items():
        images = diversity_images(gen, kind, shape)
        n = shape[0]
        metric = OldMsSsim(spatial_dims=2, **params)
        # The reference's loop: two loaders over the same images, batch 1, every ordered pair with i != j.
        matrix = torch.full((n, n), float("nan"))
        values = []
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                v = metric(images[i:i + 1], images[j:j + 1])
                matrix[i, j] = v.item()
                values.append(v.item())
        # MS-SSIM is symmetric to the bit, so the ordered-pair mean is the unordered-pair mean.
        assert torch.equal(matrix.nan_to_num(), matrix.t().nan_to_num()), name
        tensors[f"{name}/images"] = images
        tensors[f"{name}/matrix"] = matrix
        tensors[f"{name}/mean"] = torch.tensor(float(np.mean(values)), dtype=torch.float64)
        manifest.append({"name": name, "kind": "diversity", "params": params, "shape": list(shape),
                         "pairs": len(values)})
        print(f"{name:34} diversity {np.mean(values):.6f} over {len(values)} ordered pairs", file=sys.stderr)


def mean_std_cases(tensors, manifest):
    rng = np.random.default_rng(SEED)
    sets = {
        "meanstd_1": rng.normal(26.0, 1.0, 1),
        "meanstd_7": rng.normal(0.95, 0.01, 7),
        "meanstd_100": rng.normal(0.026, 0.0036, 100),
        "meanstd_1000": rng.normal(26.2458, 1.0092, 1000),
        "meanstd_1003": rng.uniform(0, 1, 1003),
        "meanstd_psnr_like_float32_items": np.array([float(v) for v in rng.normal(26, 1, 300).astype(np.float32)]),
    }
    for name, values in sets.items():
        values = list(map(float, values))  # the reference's list of Python floats
        tensors[f"{name}/values"] = torch.tensor(values, dtype=torch.float64)
        tensors[f"{name}/mean"] = torch.tensor(np.mean(values), dtype=torch.float64)
        tensors[f"{name}/std"] = torch.tensor(np.std(values), dtype=torch.float64)
        manifest.append({"name": name, "kind": "mean_std", "report": f"{np.mean(values)}+-{np.std(values)}"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # Same thread count as the Rust side: the summation order of the CPU kernels can depend on it.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    tensors, manifest = {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ssim_cases(gen, tensors, manifest)
        size_error_cases(gen, tensors, manifest)
        diversity_cases(gen, tensors, manifest)
        volume_cases(gen, tensors, manifest)
    mean_std_cases(tensors, manifest)
    torch.save({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, "tensors.pt"))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} metric cases to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
