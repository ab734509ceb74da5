"""`medgen preprocess` fixtures: synthetic BIDS-like T1w/FLAIR trees and what the reference scripts make of them.

Three input trees, under --out:
  default/input  volumes of at least 176x240x171, run with the reference crop [16:176, 16:240, 166:171]: three good
                 pairs (uint8, int16, float32, float64 on disk; scl_slope/scl_inter on some; .nii and .nii.gz; NaN and
                 extreme values outside the crop) and every bad case (missing FLAIR, too small, constant crop, NaN and
                 inf in the crop, garbage and truncated gzip, mismatched shapes, "unusable", a name without "_T1w.nii",
                 a file too shallow for the reference's grandparent-directory layout).
  custom/input   small volumes run with --crop 2:22,3:31 --slices 1:13 (12 slices, so `slice-10` sorts before
                 `slice-2`), ten subjects for the splits, directory-order traps (`ses-1` / `ses-1-b`), `T1w` in a
                 directory and in a file name (every occurrence is replaced), two volumes writing the same PNG names.
  nothing/input  only bad cases: the run must fail.

The expected outputs come from the reference logic (create_png_dataset.py, create_datalist.py) written out here: nibabel
`get_fdata`, numpy float32 min-max, `(x * 255).astype(uint8)`, `PIL.Image.fromarray(...).save`, pathlib globbing and
sorting. pandas is not installed, so the TSVs are written by hand in the format `DataFrame.to_csv(sep="\\t",
index=False)` gives (an empty split keeps its header, as medgen writes it; pandas would write a blank line). List paths
start with @ROOT@, the output directory. manifest.json says, per run, the arguments, the expected PNG tree and lists,
and each T1w file's fate (processed, or the skip kind).
"""
import argparse
import gzip
import json
import math
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

REFERENCE_CROP = ((16, 176), (16, 240), (166, 171))
CUSTOM_CROP = ((2, 22), (3, 31), (1, 13))
FULL = (176, 240, 171)
SMALL = (24, 32, 14)
ROOT = "@ROOT@"


def volume(shape, crop, dtype, seed, kind="rich"):
    """Cheap-to-compress values outside the crop (with one extreme voxel, so that a min-max over more than the crop
    shows), varied values inside it."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices(shape, dtype=np.int64)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    out = ((i + 2 * j + 3 * k) % 50).astype(np.float64)
    out[0, 0, 0] = info.max if info else 1e7
    (r0, r1), (c0, c1), (s0, s1) = crop
    sub = (slice(r0, min(r1, shape[0])), slice(c0, min(c1, shape[1])), slice(s0, min(s1, shape[2])))
    n = out[sub].shape
    if kind == "constant":
        out[sub] = 17
    elif info is not None:
        lo, hi = max(info.min, -3000), min(info.max, 3000)
        out[sub] = rng.integers(lo, hi + 1, size=n)
    else:
        out[sub] = rng.normal(300.0, 120.0, size=n) + np.sin(np.arange(n[1]) / 5.0)[None, :, None] * 40.0
    return out.astype(dtype)


def save(path, data, slope=None, inter=None):
    """Writes the array as it is (no scaling by nibabel), then sets scl_slope/scl_inter in the header bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(path.name.removesuffix(".gz") + ".tmp.nii") if path.name.endswith(".gz") else path
    nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])).to_filename(str(raw))
    if slope is not None or inter is not None:
        with open(raw, "r+b") as f:
            f.seek(112)
            f.write(struct.pack("<ff", 1.0 if slope is None else slope, 0.0 if inter is None else inter))
    if raw != path:
        path.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
        raw.unlink()


def pair(root, rel_t1w, t1w, flair):
    """Saves (data, slope, inter) tuples as the T1w at rel_t1w and the FLAIR at every T1w -> FLAIR."""
    save(root / rel_t1w, *t1w)
    if flair is not None:
        save(root / rel_t1w.replace("T1w", "FLAIR"), *flair)


def build_default(root):
    c = REFERENCE_CROP
    cases = {}
    rel = "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz"
    flair = volume(FULL, c, np.float32, 2)
    flair[1, 2, 3] = np.nan  # outside the crop: harmless
    pair(root, rel, (volume(FULL, c, np.int16, 1), 0.5, 10.0), (flair,))
    cases[rel] = None
    rel = "sub-02/ses-01/anat/sub-02_ses-01_T1w.nii"
    shape = (180, 244, 175)
    pair(root, rel, (volume(shape, c, np.uint8, 3),), (volume(shape, c, np.int16, 4), 2.0, -3.0))
    cases[rel] = None
    rel = "sub-02/ses-02/anat/sub-02_ses-02_T1w.nii.gz"
    pair(root, rel, (volume(FULL, c, np.float32, 5), 1.5, 0.25), (volume(FULL, c, np.float64, 6),))
    cases[rel] = None

    rel = "sub-03/ses-01/anat/sub-03_ses-01_T1w.nii.gz"
    pair(root, rel, (volume(SMALL, c, np.int16, 7),), None)
    cases[rel] = "missing_flair"
    rel = "sub-04/ses-01/anat/sub-04_ses-01_T1w.nii.gz"
    pair(root, rel, (volume((100, 100, 100), c, np.int16, 8),), (volume((100, 100, 100), c, np.int16, 9),))
    cases[rel] = "too_small"
    rel = "sub-05/ses-01/anat/sub-05_ses-01_T1w.nii.gz"
    pair(root, rel, (volume(FULL, c, np.int16, 10, "constant"),), (volume(FULL, c, np.int16, 11),))
    cases[rel] = "constant"
    rel = "sub-06/ses-01/anat/sub-06_ses-01_T1w.nii.gz"
    t1w = volume(FULL, c, np.float32, 12)
    t1w[100, 100, 168] = np.nan
    pair(root, rel, (t1w,), (volume(FULL, c, np.float32, 13),))
    cases[rel] = "non_finite"
    rel = "sub-07/ses-01/anat/sub-07_ses-01_T1w.nii.gz"
    pair(root, rel, (volume(SMALL, c, np.int16, 14),), (volume(SMALL, c, np.int16, 15),))
    (root / rel).write_bytes(np.random.default_rng(16).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    cases[rel] = "unreadable"
    rel = "sub-08/ses-01/anat/sub-08_ses-01_T1w.nii.gz"
    pair(root, rel, (volume(FULL, c, np.int16, 17),), (volume(FULL, c, np.int16, 18),))
    flair_path = root / rel.replace("T1w", "FLAIR")
    flair_path.write_bytes(flair_path.read_bytes()[: flair_path.stat().st_size // 2])
    cases[rel] = "unreadable"
    rel = "sub-09/ses-01/anat/sub-09_ses-01_T1w.nii.gz"
    pair(root, rel, (volume(FULL, c, np.int16, 19),), (volume((176, 240, 172), c, np.int16, 20),))
    cases[rel] = "shape_mismatch"
    rel = "sub-10_unusable/ses-01/anat/sub-10_ses-01_T1w.nii.gz"
    pair(root, rel, (volume(SMALL, c, np.int16, 21),), (volume(SMALL, c, np.int16, 22),))
    cases[rel] = "unusable"
    rel = "sub-11/ses-01/anat/sub-11_ses-01T1w.nii.gz"
    pair(root, rel, (volume(SMALL, c, np.int16, 23),), (volume(SMALL, c, np.int16, 24),))
    cases[rel] = "bad_name"
    rel = "loose_T1w.nii.gz"
    pair(root, rel, (volume(SMALL, c, np.int16, 25),), (volume(SMALL, c, np.int16, 26),))
    cases[rel] = "layout"
    rel = "sub-12/ses-01/anat/sub-12_ses-01_T1w.nii.gz"
    flair = volume(FULL, c, np.float64, 28)
    flair[20, 30, 170] = -np.inf
    pair(root, rel, (volume(FULL, c, np.float64, 27),), (flair,))
    cases[rel] = "non_finite"
    return cases


def build_custom(root):
    c = CUSTOM_CROP
    dtypes = [(np.uint8, None, None), (np.int16, None, None), (np.float32, 0.75, -2.0), (np.float64, None, None),
              (np.int16, 2.0, 100.0), (np.uint8, 0.5, 0.0)]
    cases = {}
    seed = 100
    rels = []
    for s in range(1, 11):
        rels.append(f"sub-{s:02d}/ses-1/anat/sub-{s:02d}_ses-1_T1w.nii" + ("" if s % 3 == 0 else ".gz"))
    rels += [
        "sub-01/ses-1-b/anat/sub-01_ses-1-b_T1w.nii.gz",  # sorts after ses-1 as a Path, before it as a string
        "sub-04/ses-T1w/anat/sub-04_ses-T1w_T1w.nii.gz",  # FLAIR in ses-FLAIR/, PNGs in ses-T1w/
        "sub-06/ses-2/anat/sub-06_acq-T1wlike_ses-2_T1w.nii.gz",
        "sub-07/ses-2/anat/sub-07_ses-2_T1w.nii.gz",
        "sub-07/ses-2/anat2/sub-07_ses-2_T1w.nii.gz",  # same PNG names as anat/: the later one wins
    ]
    for n, rel in enumerate(rels):
        t_dtype, t_slope, t_inter = dtypes[n % len(dtypes)]
        f_dtype, f_slope, f_inter = dtypes[(n + 2) % len(dtypes)]
        pair(root, rel, (volume(SMALL, c, t_dtype, seed), t_slope, t_inter),
             (volume(SMALL, c, f_dtype, seed + 1), f_slope, f_inter))
        seed += 2
        cases[rel] = None
    cases["sub-07/ses-2/anat/sub-07_ses-2_T1w.nii.gz"] = "duplicate"
    rel = "sub-11/ses-1/anat/sub-11_ses-1_T1w.nii.gz"
    pair(root, rel, (volume(SMALL, c, np.int16, 900),), (volume((23, 32, 14), c, np.int16, 901),))
    cases[rel] = "shape_mismatch"
    return cases


def build_nothing(root):
    c = CUSTOM_CROP
    cases = {}
    rel = "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    pair(root, rel, (volume(SMALL, c, np.int16, 1),), None)
    cases[rel] = "missing_flair"
    rel = "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"
    pair(root, rel, (volume(SMALL, c, np.int16, 2),), (volume(SMALL, c, np.int16, 3),))
    (root / rel).write_bytes(b"\x1f\x8b\x08\x00garbage")
    cases[rel] = "unreadable"
    return cases


def png_name(stem, modality, i):
    """The reference's `stem.replace('_T1w.nii', f'_slice-{i}_T1w.png')`, with `stem` the name without `.gz` (for
    .nii.gz files exactly pathlib's stem; a plain .nii file keeps its .nii here, as medgen does)."""
    return stem.replace(f"_{modality}.nii", f"_slice-{i}_{modality}.png")


def reference_extract(input_dir, output_dir, crop, cases):
    """create_png_dataset.py over every T1w the case table does not mark as skipped by a check the reference lacks
    (duplicates are extracted: the reference overwrites)."""
    (r0, r1), (c0, c1), (s0, s1) = crop
    paths = sorted(list(input_dir.glob("**/*T1w.nii.gz")) + list(input_dir.glob("**/*T1w.nii")))
    assert sorted(str(p.relative_to(input_dir)) for p in paths) == sorted(cases), "case table out of date"
    for image_path in paths:
        rel = str(image_path.relative_to(input_dir))
        if cases[rel] not in (None, "duplicate"):
            continue
        flair_path = input_dir / rel.replace("T1w", "FLAIR")
        assert "unusable" not in rel and flair_path.exists()
        new_sub_dir = output_dir / image_path.relative_to(input_dir).parents[1]
        new_sub_dir.mkdir(parents=True, exist_ok=True)
        t1w = nib.load(image_path).get_fdata()
        flair = nib.load(flair_path).get_fdata()
        t1w = t1w[r0:r1, c0:c1, s0:s1]
        flair = flair[r0:r1, c0:c1, s0:s1]
        t1w = t1w.astype("float32")
        flair = flair.astype("float32")
        with np.errstate(all="raise"):
            t1w = (t1w - t1w.min()) / (t1w.max() - t1w.min())
            flair = (flair - flair.min()) / (flair.max() - flair.min())
            t1w = (t1w * 255).astype("uint8")
            flair = (flair * 255).astype("uint8")
        for i in range(t1w.shape[2]):
            Image.fromarray(t1w[:, :, i]).save(new_sub_dir / png_name(image_path.name.removesuffix(".gz"), "T1w", i))
            Image.fromarray(flair[:, :, i]).save(new_sub_dir / png_name(flair_path.name.removesuffix(".gz"), "FLAIR", i))


def split_sizes(n, split):
    """medgen's --split: counts, or fractions of the directory count rounded down."""
    a, b = split
    if isinstance(a, float) or isinstance(b, float):
        a, b = math.floor(n * a + 1e-9), math.floor(n * b + 1e-9)
    a = min(a, n)
    return a, min(b, n - a)


def reference_lists(data_dir, lists_dir, split):
    """create_datalist.py, with the sizes of `split` (the reference's are 35000, 500)."""
    lists_dir.mkdir(parents=True, exist_ok=True)
    sub_dirs = sorted([x for x in data_dir.iterdir() if x.is_dir()])
    a, b = split_sizes(len(sub_dirs), split)
    sizes = {}
    for name, dirs in [("train", sub_dirs[:a]), ("validation", sub_dirs[a:a + b]), ("test", sub_dirs[a + b:])]:
        lines = ["t1w\tflair"]
        for sub_dir in dirs:
            for image_path in sorted(list(sub_dir.glob("**/*T1w.png"))):
                flair_path = image_path.parent / (image_path.name.replace("T1w", "FLAIR"))
                assert flair_path.exists(), flair_path
                lines.append(f"{image_path}\t{flair_path}".replace(str(data_dir), ROOT))
        (lists_dir / f"{name}.tsv").write_text("\n".join(lines) + "\n")
        sizes[name] = {"subjects": len(dirs), "rows": len(lines) - 1}
    return sizes


def fates(cases):
    return {rel: ("processed" if kind is None else kind) for rel, kind in cases.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    runs = {}

    cases = build_default(out / "default/input")
    reference_extract(out / "default/input", out / "default/expected/png", REFERENCE_CROP, cases)
    runs["default"] = {"input": "default/input", "args": [], "png": "default/expected/png",
                       "lists": "default/expected/lists", "fates": fates(cases),
                       "sizes": reference_lists(out / "default/expected/png", out / "default/expected/lists",
                                                (35000, 500))}

    cases = build_custom(out / "custom/input")
    reference_extract(out / "custom/input", out / "custom/expected/png", CUSTOM_CROP, cases)
    crop_args = ["--crop", "2:22,3:31", "--slices", "1:13"]
    for name, split, text in [("custom_counts", (3, 2), "3,2"), ("custom_fractions", (0.6, 0.2), "0.6,0.2")]:
        lists = f"custom/expected/lists_{name}"
        runs[name] = {"input": "custom/input", "args": crop_args + ["--split", text], "png": "custom/expected/png",
                      "lists": lists, "fates": fates(cases),
                      "sizes": reference_lists(out / "custom/expected/png", out / lists, split)}

    cases = build_nothing(out / "nothing/input")
    runs["nothing"] = {"input": "nothing/input", "args": crop_args, "png": None, "lists": None,
                       "fates": fates(cases), "sizes": None}

    (out / "manifest.json").write_text(json.dumps({"runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
