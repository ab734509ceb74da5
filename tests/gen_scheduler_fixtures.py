"""Scheduler parity fixtures, from MONAI 1.6.1 (monai.networks.schedulers) and monai-generative
0.2.3 (generative.networks.schedulers: the legacy cosine schedule, "leading" timesteps, CPU
noise and its DDIM inversion rule).

For each case: build the scheduler, then write <out>/<case>.safetensors with
  betas, alphas, alphas_cumprod, default_timesteps (before set_timesteps),
  timesteps, num_inference_steps (after set_timesteps(n)),
  add_noise_*/velocity_* (inputs and outputs, 1-d and 0-d timesteps),
  sample_init, model_output_<i>, prev_sample_<i>, pred_original_sample_<i> for every timestep,
  and for DDIM an inversion run: reversed_sample_init, reversed_model_output_<i>, reversed_sample_<i>,
  reversed_pred_original_sample_<i>
and <out>/manifest.json listing the cases with their medgen config (`SchedulerConfig` field names).
Model outputs are drawn from a private generator, so the global generator (seeded with
torch.manual_seed(seed) just before the trajectory) serves only the schedulers' own noise, as
tch::manual_seed(seed) does on the Rust side. Each trajectory is also run with python-int
timesteps and must give the same bits as with the 0-d tensors the inferers pass.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

import monai
import monai_compat  # noqa: F401  (before any `generative` import)
from monai.networks import schedulers as new_sched
from generative.networks import schedulers as old_sched  # noqa: E402

SHAPE = (2, 3, 4, 5)
NOISE_SHAPE = (4, 3, 4, 5)
SEED = 2024
TRAJ_SEED = 77

# medgen-only selectors: what the library choice implies, not constructor arguments.
MEDGEN_ONLY = ("cosine_version", "timestep_spacing", "noise_device", "eta")
CLASSES = {
    "monai": {"ddpm": new_sched.DDPMScheduler, "ddim": new_sched.DDIMScheduler, "pndm": new_sched.PNDMScheduler},
    "generative": {"ddpm": old_sched.DDPMScheduler, "ddim": old_sched.DDIMScheduler, "pndm": old_sched.PNDMScheduler},
}
PREDICTIONS = {"ddpm": ("epsilon", "v_prediction", "sample"), "ddim": ("epsilon", "v_prediction", "sample"),
               "pndm": ("epsilon", "v_prediction")}

SCHEDULES = {
    "linear": {"schedule": "linear_beta"},
    "scaled": {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205},
    "sigmoid": {"schedule": "sigmoid_beta", "beta_start": 2e-4, "beta_end": 3e-2, "sig_range": 5.0},
    "cosine": {"schedule": "cosine"},
    "cosine_legacy": {"schedule": "cosine", "cosine_version": "legacy"},
}


def legacy(kind, cfg):
    """The selectors that make medgen behave as monai-generative 0.2.3."""
    cfg = dict(cfg)
    if cfg.get("schedule") == "cosine":
        cfg["cosine_version"] = "legacy"
    if kind in ("ddpm", "ddim"):
        cfg["timestep_spacing"] = "leading"
        cfg["noise_device"] = "cpu"
    return cfg


def cases():
    out = []

    def add(name, kind, cfg, n=10, lib="monai", extra=None):
        if lib == "generative":
            cfg = legacy(kind, cfg)
        out.append({"name": name, "kind": kind, "lib": lib, "config": cfg, "num_inference_steps": n,
                    "extra_channels": extra})

    # Every schedule x scheduler x prediction type; the legacy cosine exists only in monai-generative.
    for sname, sched in SCHEDULES.items():
        lib = "generative" if sname == "cosine_legacy" else "monai"
        for kind, preds in PREDICTIONS.items():
            for pred in preds:
                add(f"{kind}-{sname}-{pred}", kind, dict(sched, prediction_type=pred), lib=lib)
    lin = {"schedule": "linear_beta"}
    scaled = SCHEDULES["scaled"]
    # DDPM: variance types, clipping, the t-1 quirk with n=T, spacing.
    add("ddpm-fixed_large", "ddpm", dict(lin, variance_type="fixed_large"))
    add("ddpm-learned", "ddpm", dict(lin, variance_type="learned"), extra="learned")
    add("ddpm-learned-no_split", "ddpm", dict(lin, variance_type="learned"))
    add("ddpm-learned_range", "ddpm", dict(scaled, variance_type="learned_range", prediction_type="v_prediction"),
        extra="learned_range")
    add("ddpm-learned_range-no_split", "ddpm", dict(lin, variance_type="learned_range"))
    add("ddpm-no_clip-v", "ddpm", dict(scaled, clip_sample=False, prediction_type="v_prediction"))
    add("ddpm-clip_range", "ddpm", dict(lin, clip_sample_min=-0.5, clip_sample_max=0.7, prediction_type="sample"))
    add("ddpm-full-T50", "ddpm", dict(lin, num_train_timesteps=50), n=50)
    add("ddpm-n7", "ddpm", dict(lin), n=7)
    add("ddpm-generative-n7", "ddpm", dict(lin), n=7, lib="generative")
    add("ddpm-generative-fixed_large", "ddpm", dict(scaled, variance_type="fixed_large",
                                                    prediction_type="v_prediction"), lib="generative")
    add("ddpm-cosine_s", "ddpm", {"schedule": "cosine", "s": 0.02, "num_train_timesteps": 200}, n=20)
    # DDIM: eta, final alpha, offsets, stride quirk, the reference repo's sampler.
    add("ddim-eta", "ddim", dict(lin, eta=0.5))
    add("ddim-eta-sample", "ddim", dict(scaled, eta=1.0, prediction_type="sample", clip_sample=False))
    add("ddim-generative-eta", "ddim", dict(lin, eta=0.7, prediction_type="v_prediction"), lib="generative")
    add("ddim-no_alpha_one", "ddim", dict(lin, set_alpha_to_one=False))
    add("ddim-offset1", "ddim", dict(scaled, steps_offset=1, set_alpha_to_one=False, clip_sample=False))
    add("ddim-generative-offset1", "ddim", dict(scaled, steps_offset=1, set_alpha_to_one=False), lib="generative")
    add("ddim-n7", "ddim", dict(lin), n=7)
    add("ddim-no_clip-v", "ddim", dict(lin, clip_sample=False, prediction_type="v_prediction"))
    add("ddim-clip_range", "ddim", dict(lin, clip_sample_min=-0.8, clip_sample_max=0.5))
    add("ddim-full-T20", "ddim", dict(lin, num_train_timesteps=20, set_alpha_to_one=False), n=20)
    ref = dict(scaled, prediction_type="v_prediction", clip_sample=False)
    add("ddim-reference-monai", "ddim", ref, n=200)
    add("ddim-reference-generative", "ddim", ref, n=200, lib="generative")
    # PNDM: with and without Runge-Kutta steps, offsets, final alpha.
    add("pndm-skip_prk", "pndm", dict(lin, skip_prk_steps=True))
    add("pndm-skip_prk-v", "pndm", dict(scaled, skip_prk_steps=True, prediction_type="v_prediction"), n=50)
    add("pndm-offset1", "pndm", dict(scaled, steps_offset=1))
    add("pndm-skip_prk-offset1", "pndm", dict(scaled, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=True))
    add("pndm-alpha_one", "pndm", dict(lin, set_alpha_to_one=True))
    add("pndm-n4", "pndm", dict(lin), n=4)
    add("pndm-n7", "pndm", dict(lin), n=7)
    add("pndm-generative", "pndm", dict(scaled, prediction_type="v_prediction"), lib="generative")
    return out


def build(kind, lib, cfg):
    kw = {k: v for k, v in cfg.items() if k not in MEDGEN_ONLY}
    return CLASSES[lib][kind](**kw)


def model_output(sched, cfg, t, x, target, gen, extra):
    """A plausible network output: the exact prediction for `target`, clipped, plus noise."""
    ac = sched.alphas_cumprod[int(t)]
    a, b = ac.sqrt(), (1 - ac).sqrt()
    eps = ((x - a * target) / b).clamp(-5, 5)
    pred = cfg.get("prediction_type", "epsilon")
    mo = {"epsilon": eps, "v_prediction": a * eps - b * target, "sample": target}[pred]
    mo = mo + 0.1 * torch.randn(x.shape, generator=gen)
    if extra == "learned":
        mo = torch.cat([mo, torch.rand(x.shape, generator=gen) * 0.02 + 1e-4], 1)
    elif extra == "learned_range":
        mo = torch.cat([mo, torch.rand(x.shape, generator=gen) * 2 - 1], 1)
    return mo


def step(sched, kind, cfg, mo, t, x):
    if kind == "ddim":
        return sched.step(mo, t, x, eta=cfg.get("eta", 0.0))
    return sched.step(mo, t, x)


def run(case, seed):
    kind, lib, cfg, n = case["kind"], case["lib"], case["config"], case["num_inference_steps"]
    gen = torch.Generator().manual_seed(seed)
    sched = build(kind, lib, cfg)
    out = {"betas": sched.betas, "alphas": sched.alphas, "alphas_cumprod": sched.alphas_cumprod,
           "default_timesteps": sched.timesteps.clone()}
    T = sched.num_train_timesteps

    # add_noise / get_velocity on their own instance (MONAI casts alphas_cumprod in place).
    other = build(kind, lib, cfg)
    x0 = torch.randn(NOISE_SHAPE, generator=gen)
    noise = torch.randn(NOISE_SHAPE, generator=gen)
    ts = torch.cat([torch.tensor([0, T - 1]), torch.randint(0, T, (2,), generator=gen)]).long()
    t0 = torch.tensor(T // 3)
    out.update({"add_noise_original": x0, "add_noise_noise": noise, "add_noise_timesteps": ts,
                "add_noise_timestep_0d": t0,
                "add_noise": other.add_noise(x0, noise, ts), "velocity": other.get_velocity(x0, noise, ts),
                "add_noise_0d": other.add_noise(x0, noise, t0), "velocity_0d": other.get_velocity(x0, noise, t0)})

    sched.set_timesteps(n)
    out["timesteps"] = sched.timesteps.clone().long()
    out["num_inference_steps"] = torch.tensor(sched.num_inference_steps, dtype=torch.int64)
    x = torch.randn(SHAPE, generator=gen)
    target = torch.rand(SHAPE, generator=gen) * 2 - 1
    out["sample_init"] = x
    outputs = []
    torch.manual_seed(TRAJ_SEED)
    for i, t in enumerate(sched.timesteps):
        mo = model_output(sched, cfg, t, x, target, gen, case["extra_channels"])
        prev, pred_x0 = step(sched, kind, cfg, mo, t, x)
        outputs.append(mo)
        out[f"model_output_{i}"] = mo
        out[f"prev_sample_{i}"] = prev
        if pred_x0 is not None:
            out[f"pred_original_sample_{i}"] = pred_x0
        x = prev

    # The same run with python ints for the timesteps must give the same bits.
    again = build(kind, lib, cfg)
    again.set_timesteps(n)
    x = out["sample_init"]
    torch.manual_seed(TRAJ_SEED)
    for i, t in enumerate(again.timesteps.tolist()):
        prev, _ = step(again, kind, cfg, outputs[i], t, x)
        # Bitwise, NaN included (the legacy cosine has ᾱ[0] == 1, so DDPM's t=0 step divides by 0).
        torch.testing.assert_close(prev, out[f"prev_sample_{i}"], rtol=0, atol=0, equal_nan=True,
                                   msg=f"{case['name']}: int vs tensor timestep differ at step {i}")
        x = prev

    reversed_error_at = None
    if kind == "ddim":
        # Inversion over the timesteps in increasing order; MONAI 1.6.1 raises past T-1.
        x = torch.randn(SHAPE, generator=gen)
        out["reversed_sample_init"] = x
        for i, t in enumerate(sched.timesteps.flip(0)):
            mo = model_output(sched, cfg, t, x, target, gen, None)
            try:
                nxt, pred_x0 = sched.reversed_step(mo, t, x)
            except IndexError:
                reversed_error_at = i
                out[f"reversed_model_output_{i}"] = mo
                break
            out[f"reversed_model_output_{i}"] = mo
            out[f"reversed_sample_{i}"] = nxt
            out[f"reversed_pred_original_sample_{i}"] = pred_x0
            x = nxt
    return out, reversed_error_at


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    manifest = []
    for k, case in enumerate(cases()):
        if only and case["name"] not in only:
            continue
        out, reversed_error_at = run(case, SEED + k)
        path = os.path.join(args.out, f"{case['name']}.safetensors")
        save_file({k: v.clone().contiguous() for k, v in out.items()}, path)
        manifest.append({
            "case": case["name"], "kind": case["kind"], "lib": case["lib"], "config": case["config"],
            "num_inference_steps": case["num_inference_steps"], "file": f"{case['name']}.safetensors",
            "trajectory_seed": TRAJ_SEED, "num_steps": int(out["timesteps"].numel()),
            "reversed": {"monai": "monai", "generative": "legacy"}[case["lib"]] if case["kind"] == "ddim" else None,
            "reversed_error_at": reversed_error_at,
            "versions": {"torch": torch.__version__, "monai": monai.__version__},
        })
        print(f"wrote {path}", file=sys.stderr)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
