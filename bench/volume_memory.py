"""Peak memory of 3-D sampling against volume size, with and without the sliding-window decode (docs/volumes.md).

`medgen sample 3d` (one DPM-Solver++ step, so the decode dominates) is run on an AutoencoderKL with the layout of
the model zoo's BraTS latent diffusion bundle (channels [64, 128, 256], 8 latent channels, 2 res blocks, no
attention; random weights, seeded: memory and time do not depend on the values) and a small 3-D UNet, for several
latent sizes, decoding the whole latent or by windows of `--sw-roi`; each run's peak resident memory is read with
GNU time. Writes bench/volume_memory.json and the table in bench/volume_memory.md.

    .venv/bin/python bench/volume_memory.py --medgen target/release/medgen [--sizes 12x12x12,18x22x14,36x44x28]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

AEKL = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 8, "channels": [64, 128, 256],
    "num_res_blocks": 2, "norm_num_groups": 32, "norm_eps": 1e-6, "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}
UNET = {
    "spatial_dims": 3, "in_channels": 8, "out_channels": 8, "channels": [32, 64], "attention_levels": [False, False],
    "num_res_blocks": 1, "norm_num_groups": 16,
}
SCHEDULER = {"schedule": "scaled_linear_beta", "num_train_timesteps": 1000, "beta_start": 0.0015,
             "beta_end": 0.0195, "prediction_type": "epsilon"}


def models(work):
    """The two networks' configs and weights (MONAI 1.6.1 classes, torch.save), in `work`."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    torch.manual_seed(0)
    files = {}
    for name, net, section, params in [
        ("aekl", AutoencoderKL(**AEKL, include_fc=False), "stage1", AEKL),
        ("ldm", DiffusionModelUNet(**UNET), "ldm", UNET),
    ]:
        weights = os.path.join(work, f"{name}.pt")
        torch.save(net.state_dict(), weights)
        cfg = {section: {"params": params}}
        if name == "ldm":
            cfg["ldm"]["scheduler"] = SCHEDULER
            cfg["sampling"] = {"scheduler_kind": "dpm-solver++", "scheduler": SCHEDULER, "num_inference_steps": 1,
                               "scale_factor": 1.0}
        config = os.path.join(work, f"{name}.json")
        with open(config, "w") as f:
            json.dump(cfg, f)
        files[name] = (config, weights)
    return files


def peak(medgen, files, latent, roi, out):
    """Peak RSS (MiB) and wall seconds of one `sample 3d` run."""
    (ac, aw), (lc, lw) = files["aekl"], files["ldm"]
    cmd = [medgen, "sample", "3d", "--stage1-config", ac, "--stage1-weights", aw, "--ldm-config", lc,
           "--ldm-weights", lw, "--latent-shape", "8," + latent.replace("x", ","), "--output", out,
           "--device", "cpu", "--num", "1"]
    if roi:
        cmd += ["--sw-roi", roi.replace("x", ","), "--sw-overlap", "0.25", "--sw-mode", "gaussian"]
    timed = ["/usr/bin/time", "-f", "%M %e"] + cmd
    p = subprocess.run(timed, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    kib, secs = p.stderr.strip().splitlines()[-1].split()
    return int(kib) / 1024, float(secs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--medgen", required=True)
    ap.add_argument("--sizes", default="12x12x12,18x22x14,36x44x28", help="latent sizes XxYxZ (the volume is 4x)")
    ap.add_argument("--roi", default="12x12x12", help="the sliding window, latent voxels")
    ap.add_argument("--out", default="bench")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        files = models(work)
        for size in a.sizes.split(","):
            volume = "x".join(str(4 * int(n)) for n in size.split("x"))
            for roi in [None, a.roi]:
                mib, secs = peak(a.medgen, files, size, roi, os.path.join(work, f"out_{size}_{roi}"))
                rows.append({"latent": size, "volume": volume, "window": roi or "whole", "peak_mib": round(mib),
                             "seconds": secs})
                print(rows[-1], flush=True)
    with open(os.path.join(a.out, "volume_memory.json"), "w") as f:
        json.dump({"aekl": AEKL, "unet": UNET, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    lines = ["| latent (8 ch) | volume | decode | peak RSS (MiB) |", "|---|---|---|---|"]
    for r in rows:
        window = "whole latent" if r["window"] == "whole" else f"window {r['window']}, overlap 0.25, gaussian"
        lines.append(f"| {r['latent']} | {r['volume']} | {window} | {r['peak_mib']} |")
    with open(os.path.join(a.out, "volume_memory.md"), "w") as f:
        f.write("Peak memory of `medgen sample 3d` (bench/volume_memory.py): BraTS-bundle AutoencoderKL layout "
                "(channels [64, 128, 256], 8 latent channels, 2 res blocks), one DPM-Solver++ step of a small UNet, "
                "float32, CPU; the seconds are in the JSON (not a benchmark: measured alongside other jobs).\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
