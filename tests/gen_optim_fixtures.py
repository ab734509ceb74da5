"""Optimiser parity fixtures, from PyTorch 2.13 on CPU: torch.optim.Adam/AdamW (the default single-tensor path),
torch.nn.utils.clip_grad_norm_ and torch.amp.GradScaler("cpu").

Gradients are made the way the Rust side makes them, by backward through sum_i (p_i * g_i).sum(), so p_i.grad is
g_i exactly (times the loss scale for the scaler). A parameter left out of that sum on a step has grad None
(zero_grad(set_to_none=True)) and is skipped by the optimiser.

<out>/manifest.json lists the cases. Per optimiser case, <out>/adam_<case>.safetensors holds
  init.<name>                   the parameters before the first step
  grad.<k>.<name>               the gradient of step k (absent when the parameter gets none on that step)
  param.<k>.<name>              the parameters after step k
  norm.<k>                      the total norm clip_grad_norm_ returned at step k (cases with "clip")
  state5.<field>.<name>         optimizer.state_dict() after 5 steps: exp_avg, exp_avg_sq, max_exp_avg_sq, step
Per clipping case, <out>/clip_<case>.safetensors holds grad_in.<name>, grad_out.<name> and total_norm.
<out>/scaler.safetensors holds, for two optimisers sharing one GradScaler (growth_interval 3) over a scripted
sequence with inf/NaN injected, init.<name>, grad.<k>.<name> (unscaled), param.<k>.<name>, scale_before.<k>,
scale_after.<k>, tracker_after.<k>, found_a.<k>, found_b.<k> and norm.<k> on the steps that clip.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

STEPS = 10
# Names with dots, as a model's; sizes off the SIMD widths and one big enough for the vectorised kernels.
PARAMS = [
    ("blocks.0.conv.weight", (8, 3, 3, 3)),
    ("blocks.0.conv.bias", (8,)),
    ("blocks.1.proj.weight", (37, 41)),
    ("norm.weight", (2, 5, 7)),
    ("head.weight", (1000,)),
    ("scalar", (1,)),
]
# Gradient magnitudes per step: small ones let eps matter, large ones the second moment.
GRAD_SCALES = [1.0, 0.1, 10.0, 1e-3, 1.0, 3.0, 1e-4, 1.0, 0.5, 2.0]

ADAM_CASES = [
    {"name": "adam", "algorithm": "adam", "lr": 1e-3},
    {"name": "adam_l2", "algorithm": "adam", "lr": 1e-2, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1},
    {"name": "adam_amsgrad", "algorithm": "adam", "lr": 5e-3, "weight_decay": 0.01, "amsgrad": True},
    {"name": "adamw", "algorithm": "adamw", "lr": 1e-2},
    {"name": "adamw_wd", "algorithm": "adamw", "lr": 3e-3, "betas": [0.5, 0.9], "eps": 1e-4, "weight_decay": 0.3},
    {"name": "adamw_amsgrad", "algorithm": "adamw", "lr": 2e-3, "weight_decay": 0.05, "amsgrad": True},
    # A learning-rate schedule, parameters without a gradient on some steps (the first one included), clipping.
    {"name": "adamw_sched_skip_clip", "algorithm": "adamw", "lr": 1e-2, "weight_decay": 0.1,
     "lr_schedule": [1e-2 * 0.8 ** k for k in range(STEPS)], "clip": 1.0,
     "skips": {"head.weight": [0, 5], "scalar": [3, 4], "norm.weight": [6, 7]}},
    {"name": "adam_amsgrad_skip", "algorithm": "adam", "lr": 1e-2, "betas": [0.9, 0.95], "amsgrad": True,
     "weight_decay": 0.02, "skips": {"blocks.0.conv.bias": [1, 2, 3], "head.weight": [8]}},
]

CLIP_CASES = [
    {"name": "clipped", "max_norm": 1.0, "scale": 3.0},
    {"name": "unclipped", "max_norm": 1e4, "scale": 3.0},
    {"name": "near_one", "max_norm": 5.0, "scale": 0.05},
    {"name": "with_empty", "max_norm": 0.25, "scale": 1.0, "extra": [("empty", (0, 3))]},
]

SCALER = {
    "init_scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "steps": 14,
    "a": {"algorithm": "adam", "lr": 1e-2},
    "b": {"algorithm": "adamw", "lr": 1e-2, "weight_decay": 0.01},
    "params_a": [("gen.weight", (6, 4)), ("gen.bias", (6,))],
    "params_b": [("disc.weight", (3, 17)), ("disc.bias", (3,))],
    # step -> [(name, flat index, value)]
    "inject": {
        "3": [["gen.weight", 5, "inf"]],
        "6": [["disc.bias", 1, "nan"]],
        "7": [["gen.bias", 0, "-inf"], ["disc.weight", 10, "nan"]],
        "11": [["disc.weight", 0, "inf"]],
    },
    # unscale_ then clip_grad_norm_(optimizer a's parameters) on these steps
    "clip_steps": [0, 2, 4, 7, 8, 12],
    "clip_max_norm": 0.5,
    "save_after": 7,
}


def make_optimizer(cfg, params):
    kw = {"lr": cfg["lr"], "betas": tuple(cfg.get("betas", [0.9, 0.999])), "eps": cfg.get("eps", 1e-8),
          "weight_decay": cfg.get("weight_decay", 0.0 if cfg["algorithm"] == "adam" else 1e-2),
          "amsgrad": cfg.get("amsgrad", False)}
    cls = torch.optim.Adam if cfg["algorithm"] == "adam" else torch.optim.AdamW
    opt = cls(params, **kw)
    # The defaults this case resolved to, for the Rust side.
    cfg.update({"betas": list(kw["betas"]), "eps": kw["eps"], "weight_decay": kw["weight_decay"],
                "amsgrad": kw["amsgrad"]})
    return opt


def backward_with(params, grads, scale=None):
    """p.grad = g (times the loss scale) through autograd, as the Rust side does it."""
    terms = [(p * g).sum() for p, g in zip(params, grads) if g is not None]
    if not terms:
        return
    loss = torch.stack(terms).sum()
    if scale is not None:
        loss = scale(loss)
    loss.backward()


def adam_case(case, gen):
    names = [n for n, _ in PARAMS]
    params = [torch.randn(s, generator=gen).requires_grad_(True) for _, s in PARAMS]
    out = {f"init.{n}": p.detach().clone() for n, p in zip(names, params)}
    opt = make_optimizer(case, params)
    skips = case.get("skips", {})
    for k in range(STEPS):
        if "lr_schedule" in case:
            for g in opt.param_groups:
                g["lr"] = case["lr_schedule"][k]
        grads = []
        for n, (_, s) in zip(names, PARAMS):
            if k in skips.get(n, []):
                grads.append(None)
                continue
            g = torch.randn(s, generator=gen) * GRAD_SCALES[k] * (1.0 + torch.rand((), generator=gen).item())
            out[f"grad.{k}.{n}"] = g
            grads.append(g)
        opt.zero_grad(set_to_none=True)
        backward_with(params, grads)
        for p, g in zip(params, grads):
            assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
        if "clip" in case:
            out[f"norm.{k}"] = torch.nn.utils.clip_grad_norm_(params, case["clip"]).clone()
        opt.step()
        for n, p in zip(names, params):
            out[f"param.{k}.{n}"] = p.detach().clone()
        if k == 4:
            state = opt.state_dict()["state"]
            for i, st in state.items():
                for field, t in st.items():
                    out[f"state5.{field}.{names[i]}"] = t.detach().clone()
    return out


def clip_case(case, gen):
    shapes = PARAMS + [tuple(e) for e in case.get("extra", [])]
    params = [torch.randn(s, generator=gen).requires_grad_(True) for _, s in shapes]
    out = {}
    for (n, s), p in zip(shapes, params):
        p.grad = torch.randn(s, generator=gen) * case["scale"]
        out[f"grad_in.{n}"] = p.grad.clone()
    out["total_norm"] = torch.nn.utils.clip_grad_norm_(params, case["max_norm"]).clone()
    for (n, _), p in zip(shapes, params):
        out[f"grad_out.{n}"] = p.grad.clone()
    case["names"] = [n for n, _ in shapes]
    return out


def scaler_case(cfg, gen):
    pa = [torch.randn(s, generator=gen).requires_grad_(True) for _, s in cfg["params_a"]]
    pb = [torch.randn(s, generator=gen).requires_grad_(True) for _, s in cfg["params_b"]]
    named = list(zip([n for n, _ in cfg["params_a"] + cfg["params_b"]], pa + pb))
    out = {f"init.{n}": p.detach().clone() for n, p in named}
    opt_a = make_optimizer(cfg["a"], pa)
    opt_b = make_optimizer(cfg["b"], pb)
    scaler = torch.amp.GradScaler("cpu", init_scale=cfg["init_scale"], growth_factor=cfg["growth_factor"],
                                  backoff_factor=cfg["backoff_factor"], growth_interval=cfg["growth_interval"])
    values = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
    for k in range(cfg["steps"]):
        grads = {}
        for n, p in named:
            g = torch.randn(p.shape, generator=gen)
            for name, idx, v in cfg["inject"].get(str(k), []):
                if name == n:
                    g.view(-1)[idx] = values[v]
            grads[n] = g
            out[f"grad.{k}.{n}"] = g
        opt_a.zero_grad(set_to_none=True)
        opt_b.zero_grad(set_to_none=True)
        out[f"scale_before.{k}"] = torch.tensor(scaler.get_scale(), dtype=torch.float32)
        backward_with([p for _, p in named], [grads[n] for n, _ in named], scale=scaler.scale)
        if k in cfg["clip_steps"]:
            scaler.unscale_(opt_a)
            out[f"norm.{k}"] = torch.nn.utils.clip_grad_norm_(pa, cfg["clip_max_norm"]).clone()
        scaler.step(opt_a)
        scaler.step(opt_b)
        for key, opt in (("found_a", opt_a), ("found_b", opt_b)):
            found = sum(v.item() for v in scaler._found_inf_per_device(opt).values())
            out[f"{key}.{k}"] = torch.tensor(found, dtype=torch.float32)
        scaler.update()
        out[f"scale_after.{k}"] = torch.tensor(scaler.get_scale(), dtype=torch.float32)
        out[f"tracker_after.{k}"] = torch.tensor(scaler._get_growth_tracker(), dtype=torch.int32)
        for n, p in named:
            out[f"param.{k}.{n}"] = p.detach().clone()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1234)
    for case in ADAM_CASES:
        save_file({k: v.contiguous() for k, v in adam_case(case, gen).items()},
                  os.path.join(args.out, f"adam_{case['name']}.safetensors"))
        case["params"] = [[n, list(s)] for n, s in PARAMS]
        case["steps"] = STEPS
    for case in CLIP_CASES:
        save_file(clip_case(case, gen), os.path.join(args.out, f"clip_{case['name']}.safetensors"))
        case.pop("extra", None)
    scaler = dict(SCALER)
    save_file(scaler_case(scaler, gen), os.path.join(args.out, "scaler.safetensors"))
    scaler["params_a"] = [[n, list(s)] for n, s in scaler["params_a"]]
    scaler["params_b"] = [[n, list(s)] for n, s in scaler["params_b"]]
    manifest = {"torch": torch.__version__, "adam": ADAM_CASES, "clip": CLIP_CASES, "scaler": scaler}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(ADAM_CASES)} optimiser, {len(CLIP_CASES)} clipping and 1 scaler case(s) to {args.out}")


if __name__ == "__main__":
    main()
