"""Channels-last against the default layout for one denoising step (ControlNet + UNet + guidance + DDIM).

    python bench/channels_last.py [--medgen ./target/release/medgen] [--rounds 3] [--precision fp32 bf16]
                                  [--only ref|demo] [--out FILE.json]

For each config and precision it runs `medgen bench denoise-step` with and without `--channels-last` ALTERNATELY,
in separate processes (round 1 default layout first, round 2 channels-last first, ...), and prints one table row:
min and median step time of each layout over all timed reps, their ratio (default / channels-last: above 1 means
channels-last is faster) and the largest differences the channels-last runs report against the default layout on
the same weights (of the networks' guided output, and of the DDIM step's output). Each is given for the wall time and for the process's CPU time per step: on a machine
shared with other work, the wall time also counts the waits for a core, and a `--threads 1` run's CPU time is the
steadier measure of the work itself. The load average before and after is printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # reference configs at 160x224, batch 1, guidance 7: UNet and ControlNet run on a batch of 2
    "ref": {"ldm": "configs/ldm_v0.json", "controlnet": "configs/controlnet_v0.json", "reps": 5, "warmup": 1},
    # demo configs: unconditioned, no guidance
    "demo": {"ldm": "configs/demo/ldm.json", "controlnet": "configs/demo/controlnet.json", "reps": 20, "warmup": 3},
}


def run(exe, cfg, precision, channels_last, threads):
    cmd = [exe, "bench", "denoise-step", "--ldm-config", cfg["ldm"], "--controlnet-config", cfg["controlnet"],
           "--batch", "1", "--reps", str(cfg["reps"]), "--warmup", str(cfg["warmup"]), "--threads", str(threads),
           "--precision", precision]
    if channels_last:
        cmd.append("--channels-last")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--medgen", default=str(ROOT / "target/release/medgen"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=["ref", "demo"])
    ap.add_argument("--out", help="also write every raw record to this JSON file")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    rows, records = [], []
    for name in a.only:
        cfg = CONFIGS[name]
        for precision in a.precision:
            times = {False: [], True: []}
            cpu = {False: [], True: []}
            diffs = []
            for r in range(a.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                for cl in order:
                    rec = run(a.medgen, cfg, precision, cl, a.threads)
                    rec["load_after"] = os.getloadavg()
                    records.append(rec)
                    times[cl] += rec["times_s"]
                    cpu[cl] += rec["cpu_times_s"]
                    if cl:
                        diffs.append((rec["channels_last_model_output_max_abs_diff"], rec["channels_last_max_abs_diff"]))
                    print(f"{name} {precision} {'channels-last' if cl else 'contiguous'} round {r}: "
                          f"{[round(t * 1e3, 1) for t in rec['times_s']]} ms, load {rec['load_after'][0]:.1f}",
                          file=sys.stderr, flush=True)
            cells = []
            for measure in (times, cpu):
                ms = {cl: (min(t) * 1e3, statistics.median(t) * 1e3) for cl, t in measure.items()}
                cells.append(f"{ms[False][0]:.1f} / {ms[False][1]:.1f} | {ms[True][0]:.1f} / {ms[True][1]:.1f} | "
                             f"{ms[False][0] / ms[True][0]:.3f} / {ms[False][1] / ms[True][1]:.3f}")
            rows.append(f"| {name} | {precision} | {a.threads} | {' | '.join(cells)} | {max(d[0] for d in diffs):.3e} / {max(d[1] for d in diffs):.3e} |")
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print("| config | precision | threads | wall: contiguous min / median ms | wall: channels-last min / median ms | "
          "wall ratio min / median | CPU: contiguous min / median ms | CPU: channels-last min / median ms | "
          "CPU ratio min / median | max abs diff: network output / step output |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if a.out:
        Path(a.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
