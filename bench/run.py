"""`make bench`: medgen against the Python MONAI reference, side by side on this machine.

    python bench/run.py [--quick] [--out bench] [--medgen ./target/release/medgen] [--python .venv/bin/python]

For every row it runs `MEDGEN bench CASE ...` and `PYTHON bench/reference.py CASE ...` (the same options: see
bench/reference.py) ALTERNATELY, in separate processes, for several rounds (round 1 medgen first, round 2 python
first, ...), each process doing `--warmup` untimed and `--reps` timed repetitions. It writes OUT/results.json (every
raw record) and OUT/results.md (the comparison table and the scale curves). A medgen failure (e.g. a binary without
`bench`) is recorded, not fatal. Progress goes to stderr.
"""
import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = "configs/demo"
REF = {"aekl": "configs/aekl_v0.json", "ldm": "configs/ldm_v0.json", "controlnet": "configs/controlnet_v0.json"}
DEMO_CFG = {k: f"{DEMO}/{k}.json" for k in ("aekl", "ldm", "controlnet")}
RAW = "data/raw"
IMPLS = ("medgen", "python")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# rows


def train_opts(stage, cfg, batch):
    if stage == "aekl":
        return {"config": cfg["aekl"], "batch": batch}
    if stage == "ldm":
        return {"config": cfg["ldm"], "stage1-config": cfg["aekl"], "batch": batch}
    return {"config": cfg["controlnet"], "ldm-config": cfg["ldm"], "stage1-config": cfg["aekl"], "batch": batch}


CASE_OF = {"aekl": "aekl-step", "ldm": "ldm-step", "controlnet": "controlnet-step"}
STAGE_NAME = {"aekl": "AEKL G+D", "ldm": "LDM", "controlnet": "ControlNet"}


def row(rid, case, opts, reps, warmup, label, work):
    return {"id": rid, "case": case, "opts": opts, "reps": reps, "warmup": warmup, "label": label, "work": work}


def build_rows(quick, raw, main_rounds, scale_rounds):
    """(main rows, scale rows): scale rows that repeat a main row reuse its measurement.

    Budget (2 cores): the process-to-process spread on this kind of machine is larger than the rep-to-rep one, so
    the main rows get more rounds (processes) and few reps each; the big reference-config training steps get two
    untimed steps (the second step is still markedly slower than the third on both sides) and one timed step; whole
    200-step samples at batch >1 get no warm-up (its cost is one step in 200) and one rep.
    """
    main, scale = [], []
    # training steps: demo configs at batch 8, reference configs at batch 1
    for stage in ("aekl", "ldm", "controlnet"):
        main.append(row(f"train-{stage}-demo-b8", CASE_OF[stage], train_opts(stage, DEMO_CFG, 8), 3, 1,
                        f"{CASE_OF[stage]} ({STAGE_NAME[stage]})", "demo configs, batch 8"))
    for stage in ("aekl", "ldm", "controlnet"):
        main.append(row(f"train-{stage}-ref-b1", CASE_OF[stage], train_opts(stage, REF, 1), 1, 2,
                        f"{CASE_OF[stage]} ({STAGE_NAME[stage]})", "reference configs, batch 1"))
    # one denoising step (ControlNet + UNet + CFG + DDIM)
    main.append(row("denoise-ref-b1", "denoise-step", {"ldm-config": REF["ldm"], "controlnet-config": REF["controlnet"],
                                                      "batch": 1}, 4, 1, "denoise-step",
                    "reference configs, batch 1 (guidance 7: UNet/ControlNet on 2)"))
    main.append(row("denoise-demo-b1", "denoise-step", {"ldm-config": DEMO_CFG["ldm"],
                                                       "controlnet-config": DEMO_CFG["controlnet"], "batch": 1},
                    20, 3, "denoise-step", "demo configs, batch 1 (unconditioned: no guidance)"))
    sample = {"ldm-config": DEMO_CFG["ldm"], "controlnet-config": DEMO_CFG["controlnet"],
              "stage1-config": DEMO_CFG["aekl"]}
    main.append(row("sample-demo-s200-b1", "sample", {**sample, "steps": 200, "batch": 1}, 2, 1, "sample",
                    "demo configs, 200 DDIM steps, batch 1"))
    main.append(row("sample-demo-s200-b8", "sample", {**sample, "steps": 200, "batch": 8}, 1, 0, "sample",
                    "demo configs, 200 DDIM steps, batch 8"))
    # the user's view (issue 16): one FLAIR->T1w image (and a batch of 2) at the reference configs, the Python
    # reference loop (200 DDIM steps, fp32) against medgen at the same settings and at its default fast path
    # (the reference ControlNet config's `sampling` section); and the networks in bf16 against fp32.
    ref_sample = {"ldm-config": REF["ldm"], "controlnet-config": REF["controlnet"], "stage1-config": REF["aekl"]}
    for b in (1, 2):
        main.append(row(f"user-ref-s200-b{b}", "sample", {**ref_sample, "steps": 200, "batch": b}, 1, 0, "sample",
                        f"reference configs, 200 DDIM steps, fp32, batch {b} (guidance 7)"))
    fast = fast_path()
    r = row("user-fast-b1", "sample", {**ref_sample, **fast["opts"], "batch": 1}, 1, 1, "sample",
            f"reference configs, medgen's default ({fast['label']}), batch 1")
    r["impls"], r["versus"] = ["medgen"], "user-ref-s200-b1"
    main.append(r)
    if fast["opts"]["precision"] != "bf16":
        r = row("user-fast-bf16-b1", "sample", {**ref_sample, **fast["opts"], "precision": "bf16", "batch": 1}, 1, 1,
                "sample", f"reference configs, medgen's default sampler with --precision bf16, batch 1")
        r["impls"], r["versus"] = ["medgen"], "user-ref-s200-b1"
        main.append(r)
    r = row("denoise-ref-b1-bf16", "denoise-step", {"ldm-config": REF["ldm"], "controlnet-config": REF["controlnet"],
                                                   "batch": 1, "precision": "bf16"}, 4, 1, "denoise-step",
            "reference configs, batch 1, bf16 autocast")
    r["impls"], r["versus"] = ["medgen"], "denoise-ref-b1"
    main.append(r)
    if raw:
        main.append(row("preprocess-n10", "preprocess", {"input": raw, "n": 10}, 3, 1, "preprocess",
                        f"first 10 T1w/FLAIR pairs of {raw}"))
    n_div = 10 if quick else 40
    main.append(row("diversity-n40", "diversity", {"n": n_div}, 1, 1, "diversity",
                    f"MS-SSIM over all pairs of {n_div} random 160x224 images"))

    # scale curves (demo configs)
    for b in (1, 2, 4, 8):
        scale.append(("sample-batch", b, row(f"sample-demo-s200-b{b}", "sample", {**sample, "steps": 200, "batch": b},
                                            1, 0, "sample", f"demo, 200 steps, batch {b}")))
    for st in (10, 50, 200):
        scale.append(("sample-steps", st, row(f"sample-demo-s{st}-b1", "sample", {**sample, "steps": st, "batch": 1},
                                             3, 1, "sample", f"demo, {st} steps, batch 1")))
    for stage in ("aekl", "ldm", "controlnet"):
        for b in (1, 2, 4, 8):
            scale.append((f"train-{stage}", b, row(f"train-{stage}-demo-b{b}", CASE_OF[stage],
                                                   train_opts(stage, DEMO_CFG, b), 3, 1,
                                                   f"{CASE_OF[stage]} ({STAGE_NAME[stage]})", f"demo, batch {b}")))
    for r in main:
        r["rounds"] = main_rounds
    for _, _, r in scale:
        r["rounds"] = scale_rounds
    if quick:
        scale = [s for s in scale if s[2]["id"] in {r["id"] for r in main}]
        for r in main:
            r["reps"], r["warmup"] = 1, min(r["warmup"], 1)
    return main, scale


def fast_path():
    """medgen's default sampling at the reference configs: the reference ControlNet config's `sampling` section."""
    sec = json.loads((ROOT / REF["controlnet"]).read_text()).get("sampling", {})
    kind, steps = sec.get("scheduler_kind", "ddim"), sec.get("num_inference_steps", 200)
    precision = sec.get("precision", "fp32")
    return {"opts": {"scheduler": kind, "steps": steps, "precision": precision},
            "label": f"{kind} {steps} steps, {precision}"}


# ----------------------------------------------------------------------------------------------------------------
# running


def command(impl, r, exe, threads):
    base = [exe, "bench"] if impl == "medgen" else [exe, "bench/reference.py"]
    cmd = base + [r["case"]]
    for k, v in r["opts"].items():
        cmd += [f"--{k}", str(v)]
    return cmd + ["--reps", str(r["reps"]), "--warmup", str(r["warmup"]), "--threads", str(threads)]


def tail(text, n=1500):
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def busy_cpu_s():
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat), or None."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_one(impl, r, exe, threads, timeout):
    cmd = command(impl, r, exe, threads)
    busy0, own0 = busy_cpu_s(), children_cpu_s()
    t0 = time.perf_counter()
    rec = {"row": r["id"], "impl": impl, "cmd": " ".join(shlex.quote(c) for c in cmd)}
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        rec.update(error=f"timed out after {timeout} s", wall_s=time.perf_counter() - t0)
        return rec
    except OSError as e:
        rec.update(error=f"cannot run: {e}", wall_s=time.perf_counter() - t0)
        return rec
    rec["wall_s"] = time.perf_counter() - t0
    rec["rc"] = p.returncode
    busy1, own1 = busy_cpu_s(), children_cpu_s()
    if busy0 is not None and busy1 is not None:
        # CPU time other processes took while this one ran, as a fraction of the machine: > ~0.1 means the
        # measurement was disturbed (a build, another benchmark)
        rec["cpu_s"] = own1 - own0
        rec["others_cpu_frac"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (rec["wall_s"] * (os.cpu_count() or 1))
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    out = None
    if p.returncode == 0 and lines:
        try:
            out = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    if out is None or not out.get("times_s"):
        rec["error"] = f"exit {p.returncode}: " + tail(p.stderr or p.stdout or "(no output)")
    else:
        rec["result"] = out
    return rec


def probe_medgen(exe):
    """None if `medgen bench` is there, else why not."""
    path = ROOT / exe if not os.path.isabs(exe) else Path(exe)
    if not path.exists():
        return f"{exe} not found (build it: cargo build --release)"
    try:
        p = subprocess.run([exe, "bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError as e:
        return f"cannot run {exe}: {e}"
    if p.returncode != 0:
        return f"`{exe} bench --help` failed (exit {p.returncode}): " + tail(p.stderr or p.stdout, 400)
    return None


# ----------------------------------------------------------------------------------------------------------------
# summaries and the report


def summarize(records):
    """Per impl: all timed reps pooled over rounds, min/median per rep and per unit, peak RSS (max)."""
    out = {}
    for impl in IMPLS:
        recs = [r for r in records if r["impl"] == impl]
        ok = [r["result"] for r in recs if "result" in r]
        errors = [r["error"] for r in recs if "error" in r]
        if not ok:
            out[impl] = {"error": errors[0] if errors else "not run"}
            continue
        times = [t for o in ok for t in o["times_s"]]
        units = ok[0]["units_per_rep"]
        out[impl] = {"n": len(times), "min_s": min(times), "median_s": statistics.median(times),
                     "max_s": max(times), "units_per_rep": units, "unit": ok[0]["unit"],
                     "median_per_unit_s": statistics.median(times) / units,
                     "peak_rss_mb": max(o["peak_rss_mb"] for o in ok),
                     "import_rss_mb": max((o.get("import_rss_mb") or 0) for o in ok) or None,
                     "process_wall_s": sum(r["wall_s"] for r in recs), "errors": errors,
                     "others_cpu_frac_max": max((r.get("others_cpu_frac", 0.0) for r in recs), default=0.0)}
    m, p = out["medgen"], out["python"]
    if "median_s" in m and "median_s" in p:
        out["ratio"] = p["median_s"] / m["median_s"]
        # paired: python / medgen within each round (adjacent processes), which cancels slow spells of the machine
        per_round = []
        for rnd in sorted({r.get("round") for r in records}):
            med = {}
            for r in records:
                if r.get("round") == rnd and "result" in r:
                    med[r["impl"]] = statistics.median(r["result"]["times_s"])
            if len(med) == 2:
                per_round.append(med["python"] / med["medgen"])
        out["ratio_per_round"] = per_round
    return out


def fmt_t(s):
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_pair(sm):
    if "median_s" not in sm:
        return "failed¹"
    return f"{fmt_t(sm['min_s'])} / {fmt_t(sm['median_s'])}"


def fmt_ratio(x):
    return "–" if x is None else f"**{x:.2f}×**"


def fmt_rounds(s):
    rr = s.get("ratio_per_round") or []
    return " / ".join(f"{x:.2f}" for x in rr) if rr else "–"


def fmt_rss(sm):
    return f"{sm['peak_rss_mb']:.0f}" if "peak_rss_mb" in sm else "–"


def work_per_rep(s):
    parts = []
    for impl in IMPLS:
        if "units_per_rep" in s[impl]:
            parts.append((impl, s[impl]["units_per_rep"], s[impl]["unit"]))
    if not parts:
        return "–"
    if len({(u, n) for _, u, n in parts}) == 1:
        _, u, n = parts[0]
        return f"{u} {n}{'s' if u != 1 else ''}"
    return ", ".join(f"{impl}: {u} {n}s" for impl, u, n in parts)


def machine_info(python):
    cpu = "?"
    try:
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else platform.processor() or "?"
    except OSError:
        pass
    mem = "?"
    try:
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem = f"{int(m.group(1)) / 1024 / 1024:.1f} GiB" if m else "?"
    except OSError:
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nproc = str(len(os.sched_getaffinity(0)))
    try:
        torch_v = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                 text=True, timeout=120).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        torch_v = "?"
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        git = git + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        git = "?"
    return {"nproc": nproc, "cpu": cpu, "mem_total": mem, "torch": torch_v, "python": platform.python_version(),
            "kernel": platform.release(), "git": git}


def loadavg():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


NOTES = """\
**How it is measured.** Every row runs `medgen bench CASE ...` and `bench/reference.py CASE ...` (the Python MONAI
reference: torch {torch}, MONAI 1.6.1, monai-generative 0.2.3) with the same options, alternately, in separate
processes: {rounds} rounds for the main table and {scale_rounds} for rows only in the scale curves (odd rounds medgen
first, even rounds python first; all rows of round 1, then all rows of round 2, ...), each process doing its warm-up
repetitions (not timed) and then its timed repetitions; min and median are over all timed repetitions of all rounds.
"Ratio in each round" is python / medgen between the two adjacent processes of one round: the spread between
processes on this machine (shared host) is often larger than between repetitions in one process, and these paired
ratios are the least affected by it.
Both sides run on the CPU in fp32 with `--threads {threads}` intra-op threads, networks built from the same JSON
configs with random weights (timing only: the inputs and weights are random but the work is the reference's). The
ratio is python median / medgen median for the same work per repetition (>1: medgen faster). Peak RSS is the
process's VmHWM (the highest over the rounds); it includes everything the process loaded (for Python,
`import torch` + MONAI alone is ~{import_rss} MiB before any network is built).

What each case times (reference-repo.md sections in parentheses):
* `aekl-step`: one generator step (L1 + KL + adversarial, grad clip 1, Adam) then one discriminator step (§3.5).
  The perceptual (LPIPS) term is skipped on both sides (no ImageNet backbone offline); AMP off.
* `ldm-step` / `controlnet-step`: frozen-AEKL encoding (posterior sample) × 0.3, noise, random t, v-prediction MSE,
  AdamW; the ControlNet step with the UNet frozen and a 160×224 FLAIR condition (§3.6, §3.7). The CLIP text
  encoder is replaced by a fixed random (B, 77, 1024) context on both sides (the reference ran it every step).
* `denoise-step`: one step of `sample_flair_to_t1w.py` (§4.2) under no_grad: ControlNet then UNet on the
  duplicated 2B batch with one timestep, guidance 7, DDIM step. The demo UNet is unconditioned: no duplication.
* `sample`: a whole FLAIR→T1w sample, DDIM (clip_sample off), then decode latent/0.3 and clip; time per
  repetition is for the whole batch.
* `preprocess`: `create_png_dataset.py` (§1.1: nibabel, numpy float32 min-max, PIL PNGs) over copies of the first N
  subject folders; the Python side is the reference's serial loop (`tests/gen_preprocess_fixtures.py`), medgen
  uses `--threads` workers.
* `diversity`: `compute_msssim_sample.py` (§5.3), MultiScaleSSIMMetric(kernel 7, data range 1) over all pairs of N
  images. The reference evaluates every ordered pair (N(N-1) calls, batch 1); MS-SSIM is symmetric, so medgen may
  evaluate each unordered pair once: the ratio compares the time for the same result (the mean over N images).
"""


def write_report(out_dir, meta, main, scale, results):
    md = []
    md.append("# medgen vs the Python MONAI reference: side-by-side benchmark\n")
    mi = meta["machine"]
    md.append(f"* Date: {meta['date']} (run took {meta['total_wall_s'] / 60:.1f} min"
              + (", **incomplete**" if not meta.get("complete") else "") + ")")
    md.append(f"* Machine: {mi['nproc']} CPUs (nproc), {mi['cpu']}, {mi['mem_total']} RAM, Linux {mi['kernel']}")
    md.append(f"* torch {mi['torch']} (both sides), Python {mi['python']}; medgen at git {mi['git']}")
    md.append(f"* Threads {meta['threads']}; {meta['rounds']} round{'s' if meta['rounds'] != 1 else ''} per main row, "
              f"{meta['scale_rounds']} per scale-curve-only row"
              + (" (--quick: 1 round, 1 rep)" if meta["quick"] else "")
              + f"; load average at start {meta['load_start']}, at end {meta.get('load_end', '?')}")
    md.append(f"* Commands: `{meta['medgen']} bench CASE ...` and `{meta['python']} bench/reference.py CASE ...`")
    if meta.get("medgen_unavailable"):
        md.append(f"* **medgen not benchmarked**: {meta['medgen_unavailable']}")
    for note in meta.get("notes", []):
        md.append(f"* {note}")
    md.append("")
    md.append("## Results\n")
    md.append("Times per repetition, min / median. Ratio = python median / medgen median (>1: medgen faster).\n")
    md.append("| case | params | work per rep | medgen min / median | python min / median | ratio python/medgen "
              "(median) | ratio in each round | peak RSS medgen / python (MiB) |")
    md.append("|---|---|---|---|---|---|---|---|")
    failures = []
    for r in main:
        s = results.get(r["id"])
        if s is None:
            md.append(f"| {r['label']} | {r['work']} | – | not run | not run | – | – | – |")
            continue
        py = fmt_pair(s["python"]) if "python" in r.get("impls", IMPLS) else "– (medgen only)"
        md.append(f"| {r['label']} | {r['work']} | {work_per_rep(s)} | {fmt_pair(s['medgen'])} | "
                  f"{py} | {fmt_ratio(s.get('ratio'))} | {fmt_rounds(s)} | "
                  f"{fmt_rss(s['medgen'])} / {fmt_rss(s['python'])} |")
        for impl in r.get("impls", IMPLS):
            if "error" in s[impl]:
                failures.append((r["id"], impl, s[impl]["error"]))
    md.append("")
    disturbed = []
    for rid, s in results.items():
        worst = max((s[i].get("others_cpu_frac_max") or 0.0) for i in IMPLS)
        if worst > 0.1:
            disturbed.append(f"`{rid}` ({worst:.0%})")
    if disturbed:
        md.append("**Disturbed measurements**: other processes took more than 10% of the machine's CPU time while "
                  "these rows ran (the highest share in parentheses; see `others_cpu_frac` in results.json): "
                  + ", ".join(disturbed) + ".\n")
    else:
        md.append("No measurement was disturbed: no other process took more than 10% of the machine's CPU time "
                  "while one ran (`others_cpu_frac` in results.json).\n")

    user = [r for r in main if r.get("versus")]
    if user:
        md.append("## The user's view: one FLAIR->T1w image at the reference configs\n")
        md.append("medgen-only rows against another row's median per image (the Python reference loop for the "
                  "sampler, medgen fp32 for bf16). Targets (issue 16): reference settings >= 1.15x, default fast path "
                  ">= 10x, bf16 >= 1.5x.\n")
        md.append("| comparison | this row (median per unit) | against (median per unit) | ratio |")
        md.append("|---|---|---|---|")
        for r in [x for x in main if x["id"].startswith("user-ref")]:
            s = results.get(r["id"])
            if s and s.get("ratio"):
                md.append(f"| medgen at the reference's settings vs the Python reference ({r['work']}) | "
                          f"{fmt_t(s['medgen']['median_per_unit_s'])} | {fmt_t(s['python']['median_per_unit_s'])} | "
                          f"{fmt_ratio(s['ratio'])} |")
        for r in user:
            s, v = results.get(r["id"]), results.get(r["versus"])
            if not s or not v or "median_per_unit_s" not in s["medgen"]:
                md.append(f"| {r['work']} | not run | – | – |")
                continue
            against = v["python"] if r["case"] == "sample" else v["medgen"]
            who = "Python reference, 200 DDIM steps fp32" if r["case"] == "sample" else "medgen fp32"
            if "median_per_unit_s" not in against:
                md.append(f"| {r['work']} | {fmt_t(s['medgen']['median_per_unit_s'])} | {who}: not run | – |")
                continue
            ratio = against["median_per_unit_s"] / s["medgen"]["median_per_unit_s"]
            md.append(f"| {r['work']} vs {who} | {fmt_t(s['medgen']['median_per_unit_s'])} | "
                      f"{fmt_t(against['median_per_unit_s'])} | {fmt_ratio(ratio)} |")
        md.append("")

    if scale:
        md.append("## Scale curves (demo configs)\n")
    groups = [("sample-batch", "Sampling time per image against batch size (200 DDIM steps)", "batch", "image"),
              ("sample-steps", "Sampling time per image against DDIM steps (batch 1)", "steps", "image"),
              ("train-aekl", "AEKL G+D training step against batch size", "batch", "step"),
              ("train-ldm", "LDM training step against batch size", "batch", "step"),
              ("train-controlnet", "ControlNet training step against batch size", "batch", "step")]
    for g, title, var, unit in groups:
        items = [(x, r) for gg, x, r in scale if gg == g]
        if not items:
            continue
        md.append(f"### {title}\n")
        per = "per image" if unit == "image" else "per step"
        extra = " | medgen / python per image" if unit == "step" else ""
        md.append(f"| {var} | medgen {per} (median) | python {per} (median) | ratio python/medgen | ratio in each "
                  f"round{extra} |")
        md.append("|---|---|---|---|---|" + ("---|" if unit == "step" else ""))
        for x, r in items:
            s = results.get(r["id"])
            if s is None:
                md.append(f"| {x} | not run | not run | – | – |" + (" – |" if unit == "step" else ""))
                continue
            cells = []
            for impl in IMPLS:
                cells.append(fmt_t(s[impl]["median_per_unit_s"]) if "median_per_unit_s" in s[impl] else "failed¹")
            line = f"| {x} | {cells[0]} | {cells[1]} | {fmt_ratio(s.get('ratio'))} | {fmt_rounds(s)} |"
            if unit == "step":
                b = r["opts"]["batch"]
                per_img = [fmt_t(s[i]["median_s"] / b) if "median_s" in s[i] else "–" for i in IMPLS]
                line += f" {per_img[0]} / {per_img[1]} |"
            md.append(line)
        md.append("")

    if failures:
        md.append("## Failures\n")
        seen = set()
        for rid, impl, err in failures:
            key = (impl, err)
            if key in seen:
                md.append(f"* ¹ `{rid}` {impl}: same error as above")
                continue
            seen.add(key)
            md.append(f"* ¹ `{rid}` {impl}:\n\n```\n{err}\n```")
        md.append("")
    md.append("## Method\n")
    imp = [s["python"].get("import_rss_mb") for s in results.values() if s["python"].get("import_rss_mb")]
    md.append(NOTES.format(torch=meta["machine"]["torch"], rounds=meta["rounds"], scale_rounds=meta["scale_rounds"],
                           threads=meta["threads"],
                           import_rss=f"{statistics.median(imp):.0f}" if imp else "?"))
    md.append("Raw records (every process, every repetition): `results.json`.")
    (out_dir / "results.md").write_text("\n".join(md) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 1 rep, no scale-curve-only rows, diversity n 10")
    ap.add_argument("--out", default="bench")
    ap.add_argument("--medgen", default="./target/release/medgen")
    ap.add_argument("--python", default=".venv/bin/python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the main rows: default 3 (1 with --quick)")
    ap.add_argument("--scale-rounds", type=int, default=None,
                    help="rounds of the rows only in the scale curves: default 2 (1 with --quick)")
    ap.add_argument("--only", help="regex: run only the rows whose id matches")
    ap.add_argument("--impls", default="medgen,python", help="comma-separated subset of medgen,python")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per process")
    ap.add_argument("--raw", default=RAW, help="raw data set root (sub-*/ses-01/anat/*.nii.gz) for the preprocess row")
    a = ap.parse_args()
    rounds = a.rounds or (1 if a.quick else 3)
    scale_rounds = a.scale_rounds or (1 if a.quick else 2)
    impls = [i for i in a.impls.split(",") if i]
    assert all(i in IMPLS for i in impls), a.impls
    out_dir = (ROOT / a.out) if not os.path.isabs(a.out) else Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    raw = ROOT / a.raw
    have_raw = raw.is_dir() and any(p.is_dir() for p in raw.iterdir())
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(a.python), "threads": a.threads, "rounds": rounds, "scale_rounds": scale_rounds,
            "quick": a.quick,
            "medgen": a.medgen, "python": a.python, "load_start": loadavg(), "notes": []}
    if not have_raw:
        note = f"preprocess skipped: no subject folders in {a.raw} (`make bench` synthesises them)"
        log(f"note: {note}")
        meta["notes"].append(note)
    if "medgen" in impls:
        why = probe_medgen(a.medgen)
        if why:
            log(f"note: medgen not benchmarked: {why}")
            meta["medgen_unavailable"] = why
    main_rows, scale = build_rows(a.quick, a.raw if have_raw else None, rounds, scale_rounds)
    todo, seen = [], set()
    for r in main_rows + [s[2] for s in scale]:
        if r["id"] not in seen and (not a.only or re.search(a.only, r["id"])):
            seen.add(r["id"])
            todo.append(r)
    log(f"bench: {len(todo)} rows, {sum(r['rounds'] for r in todo) * len(impls)} processes; medgen {a.medgen}, "
        f"python {a.python}, threads {a.threads}")

    records, results = [], {}

    def save(complete):
        meta["total_wall_s"] = time.perf_counter() - t_start
        meta["complete"] = complete
        meta["load_end"] = loadavg()
        (out_dir / "results.json").write_text(json.dumps(
            {"meta": meta, "rows": [{**r, "summary": results.get(r["id"])} for r in todo], "records": records},
            indent=1))
        write_report(out_dir, meta, [r for r in main_rows if r["id"] in seen],
                     [s for s in scale if s[2]["id"] in seen], results)

    # round-major: every row's round 1, then every row's round 2, ... so that a slow spell of the machine hits one
    # round of a row, not all of them; within a round the two implementations run back to back.
    by_row = {r["id"]: [] for r in todo}
    max_rounds = max((r["rounds"] for r in todo), default=0)
    n_proc, done = sum(r["rounds"] * len([i for i in impls if i in r.get("impls", IMPLS)]) for r in todo), 0
    for rnd in range(max_rounds):
        for r in todo:
            if rnd >= r["rounds"]:
                continue
            order = [i for i in (impls if rnd % 2 == 0 else impls[::-1]) if i in r.get("impls", IMPLS)]
            for impl in order:
                done += 1
                if impl == "medgen" and meta.get("medgen_unavailable"):
                    rec = {"row": r["id"], "impl": impl, "round": rnd, "error": meta["medgen_unavailable"]}
                else:
                    exe = a.medgen if impl == "medgen" else a.python
                    el = (time.perf_counter() - t_start) / 60
                    log(f"[{done}/{n_proc}, {el:.1f} min] {r['id']} round {rnd + 1}/{r['rounds']} {impl} ...")
                    rec = run_one(impl, r, exe, a.threads, a.timeout)
                    rec["round"] = rnd
                    if "result" in rec:
                        ts = rec["result"]["times_s"]
                        log(f"    {impl}: median {fmt_t(statistics.median(ts))} over {len(ts)} reps, "
                            f"peak RSS {rec['result']['peak_rss_mb']:.0f} MiB, process {rec['wall_s']:.1f} s, "
                            f"others' CPU {rec.get('others_cpu_frac', float('nan')):.0%}")
                    else:
                        log(f"    {impl} FAILED ({rec['wall_s']:.1f} s): {rec['error'][-300:]}")
                records.append(rec)
                by_row[r["id"]].append(rec)
            results[r["id"]] = summarize(by_row[r["id"]])
            rr = results[r["id"]].get("ratio_per_round")
            if rr:
                log(f"    ratio python/medgen this round {rr[-1]:.2f}x")
            save(False)
    save(True)
    log(f"bench: done in {meta['total_wall_s'] / 60:.1f} min; {out_dir / 'results.md'}")


if __name__ == "__main__":
    main()
