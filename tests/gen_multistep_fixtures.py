"""Parity fixtures for the multistep samplers, from diffusers 0.42 (DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++", solver_type="midpoint"; UniPCMultistepScheduler with solver_type="bh2",
predict_x0=True), given MONAI 1.6.1's betas as `trained_betas` so that both sides share one noise schedule
(asserted: diffusers' alphas_cumprod equals MONAI's bit for bit).

For each case, <out>/<case>.safetensors holds
  timesteps, sigmas (after set_timesteps(n)),
  step by step, on diffusers' own trajectory with a plausible network output:
    sample_<i>, model_output_<i>, prev_sample_<i>, pred_original_sample_<i> (diffusers' model_outputs[-1],
    the data prediction x0 of that step),
  a whole loop with a deterministic "network" that medgen computes the same way,
    model_output = 0.9 * x + 0.1 * sin(x) + cos(t / 1000):
    traj_init, traj_<i> (the sample after step i),
and <out>/manifest.json lists the cases with their medgen kind and `SchedulerConfig`.
<out>/timestep_tables.safetensors holds diffusers' timesteps for every n in 1..=T (T = 1000 and 50) and
spacing (leading also with steps_offset 1): ts_<T>_<spacing>_<offset> (the lists concatenated, int16) and
len_<T>_<spacing>_<offset> (one length per n); every list of the table is checked to be the same for UniPC.
"""
import argparse
import json
import math
import os
import sys
import warnings

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import monai
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from monai.networks.schedulers import DDPMScheduler

SHAPE = (2, 3, 4, 5)
SEED = 4242
SCHEDULE_KEYS = ("schedule", "num_train_timesteps", "beta_start", "beta_end", "sig_range", "s")

SCHEDULES = {
    "scaled": {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205},
    "linear": {"schedule": "linear_beta"},
    "sigmoid": {"schedule": "sigmoid_beta", "beta_start": 2e-4, "beta_end": 3e-2, "sig_range": 5.0},
    "cosine": {"schedule": "cosine"},
}


def cases():
    out = []

    def add(name, kind, cfg, n):
        out.append({"name": name, "kind": kind, "config": cfg, "num_inference_steps": n})

    # The grid: kind x order x prediction x spacing x schedule, the step count cycling over 10, 15, 25, 7.
    steps = [10, 15, 25, 7]
    k = 0
    for kind, order in (("dpm-solver++", 1), ("dpm-solver++", 2), ("unipc", 2)):
        for sname in ("scaled", "linear"):
            for pred in ("epsilon", "v_prediction", "sample"):
                for spacing in ("leading", "linspace", "trailing"):
                    n = steps[k % len(steps)]
                    k += 1
                    cfg = dict(SCHEDULES[sname], prediction_type=pred, timestep_spacing=spacing, solver_order=order)
                    short = {"dpm-solver++": "dpm", "unipc": "unipc"}[kind]
                    add(f"{short}{order}-{sname}-{pred}-{spacing}-n{n}", kind, cfg, n)
    scaled, lin = SCHEDULES["scaled"], SCHEDULES["linear"]
    # Defaults: an empty config must be diffusers' constructor defaults.
    add("dpm-defaults", "dpm-solver++", {}, 20)
    add("unipc-defaults", "unipc", {}, 20)
    # lower_order_final off (for DPM with orders 1-2 it changes nothing, which the fixture shows).
    add("dpm2-no_lower_order_final", "dpm-solver++", dict(scaled, prediction_type="v_prediction",
                                                         lower_order_final=False), 10)
    add("unipc1-no_lower_order_final", "unipc", dict(scaled, solver_order=1, lower_order_final=False), 10)
    add("unipc1-scaled-v", "unipc", dict(scaled, solver_order=1, prediction_type="v_prediction"), 12)
    # steps_offset with the leading spacing.
    add("dpm2-leading-offset1", "dpm-solver++", dict(scaled, timestep_spacing="leading", steps_offset=1), 10)
    add("unipc2-leading-offset1", "unipc", dict(lin, timestep_spacing="leading", steps_offset=1,
                                                prediction_type="v_prediction"), 25)
    # Short and long runs.
    add("dpm2-n1", "dpm-solver++", dict(scaled), 1)
    add("dpm2-n2", "dpm-solver++", dict(scaled, prediction_type="v_prediction"), 2)
    add("unipc2-n1", "unipc", dict(scaled), 1)
    add("unipc2-n2", "unipc", dict(scaled), 2)
    add("unipc2-n3", "unipc", dict(scaled, timestep_spacing="trailing"), 3)
    add("unipc2-trailing-n200", "unipc", dict(scaled, timestep_spacing="trailing", prediction_type="v_prediction"),
        200)
    add("dpm2-linspace-n100", "dpm-solver++", dict(scaled, prediction_type="v_prediction"), 100)
    # The whole schedule, down to timestep 0.
    add("dpm2-T50-trailing-n50", "dpm-solver++", dict(lin, num_train_timesteps=50, timestep_spacing="trailing"), 50)
    add("unipc2-T50-trailing-n50", "unipc", dict(lin, num_train_timesteps=50, timestep_spacing="trailing"), 50)
    # Other MONAI schedules (their ᾱ is the cumprod of their alphas, so diffusers can take their betas).
    add("dpm2-sigmoid-v", "dpm-solver++", dict(SCHEDULES["sigmoid"], prediction_type="v_prediction"), 10)
    add("unipc2-sigmoid-eps", "unipc", dict(SCHEDULES["sigmoid"]), 10)
    add("dpm2-cosine-eps", "dpm-solver++", dict(SCHEDULES["cosine"], timestep_spacing="trailing"), 10)
    add("unipc2-cosine-v", "unipc", dict(SCHEDULES["cosine"], prediction_type="v_prediction",
                                         timestep_spacing="leading"), 15)
    return out


def monai_schedule(cfg):
    """MONAI's tables for the schedule part of a medgen config."""
    kw = {k: v for k, v in cfg.items() if k in SCHEDULE_KEYS}
    return DDPMScheduler(**kw)


def build(kind, cfg):
    """The diffusers scheduler a medgen config stands for (unset fields: diffusers' defaults)."""
    ref = monai_schedule(cfg)
    kw = {
        "num_train_timesteps": cfg.get("num_train_timesteps", 1000),
        "trained_betas": ref.betas.numpy(),
        "prediction_type": cfg.get("prediction_type", "epsilon"),
        "final_sigmas_type": "zero",
    }
    for key in ("timestep_spacing", "steps_offset", "solver_order", "lower_order_final"):
        if key in cfg:
            kw[key] = cfg[key]
    if kind == "dpm-solver++":
        s = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **kw)
    else:
        s = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, disable_corrector=[], **kw)
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod), f"{kind}: diffusers' alphas_cumprod differ from MONAI's"
    return s


def model_output(sched, pred, t, x, target, gen):
    """A plausible network output: the exact prediction for `target`, clipped, plus noise."""
    ac = sched.alphas_cumprod[int(t)]
    a, b = ac.sqrt(), (1 - ac).sqrt()
    eps = ((x - a * target) / b).clamp(-5, 5)
    mo = {"epsilon": eps, "v_prediction": a * eps - b * target, "sample": target}[pred]
    return mo + 0.1 * torch.randn(x.shape, generator=gen)


def toy_network(x, t):
    """The deterministic "network" of the whole-loop check; tests/parity_multistep.rs computes the same."""
    return 0.9 * x + 0.1 * torch.sin(x) + math.cos(int(t) / 1000)


def run(case, seed):
    kind, cfg, n = case["kind"], case["config"], case["num_inference_steps"]
    pred = cfg.get("prediction_type", "epsilon")
    gen = torch.Generator().manual_seed(seed)
    sched = build(kind, cfg)
    sched.set_timesteps(n)
    out = {"timesteps": sched.timesteps.clone().long(), "sigmas": sched.sigmas.clone()}
    x = torch.randn(SHAPE, generator=gen)
    target = torch.rand(SHAPE, generator=gen) * 2 - 1
    for i, t in enumerate(sched.timesteps):
        mo = model_output(sched, pred, t, x, target, gen)
        prev = sched.step(mo, t, x).prev_sample
        out[f"sample_{i}"] = x
        out[f"model_output_{i}"] = mo
        out[f"prev_sample_{i}"] = prev
        out[f"pred_original_sample_{i}"] = sched.model_outputs[-1].clone()
        x = prev

    loop = build(kind, cfg)
    loop.set_timesteps(n)
    x = torch.randn(SHAPE, generator=gen)
    out["traj_init"] = x
    for i, t in enumerate(loop.timesteps):
        x = loop.step(toy_network(x, t), t, x).prev_sample
        out[f"traj_{i}"] = x
    return out


def timestep_tables():
    out = {}
    for T in (1000, 50):
        for spacing, offset in (("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)):
            kw = {"num_train_timesteps": T, "timestep_spacing": spacing, "steps_offset": offset}
            dpm, uni = DPMSolverMultistepScheduler(**kw), UniPCMultistepScheduler(**kw)
            lists, lens = [], []
            for n in range(1, T + 1):
                dpm.set_timesteps(n)
                uni.set_timesteps(n)
                assert torch.equal(dpm.timesteps, uni.timesteps), f"T={T} {spacing} n={n}: DPM and UniPC differ"
                lists.append(dpm.timesteps.clone())
                lens.append(len(dpm.timesteps))
            key = f"{T}_{spacing}_{offset}"
            out[f"ts_{key}"] = torch.cat(lists).to(torch.int16)
            out[f"len_{key}"] = torch.tensor(lens, dtype=torch.int16)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)
    os.makedirs(args.out, exist_ok=True)
    manifest = []
    for k, case in enumerate(cases()):
        out = run(case, SEED + k)
        path = os.path.join(args.out, f"{case['name']}.safetensors")
        save_file({name: v.clone().contiguous() for name, v in out.items()}, path)
        manifest.append({
            "case": case["name"], "kind": case["kind"], "config": case["config"],
            "num_inference_steps": case["num_inference_steps"], "file": f"{case['name']}.safetensors",
            "num_steps": int(out["timesteps"].numel()),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "monai": monai.__version__,
                         "numpy": np.__version__},
        })
        print(f"wrote {path}", file=sys.stderr)
    save_file(timestep_tables(), os.path.join(args.out, "timestep_tables.safetensors"))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
