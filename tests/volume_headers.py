"""nibabel's side of tests/volume_translate.rs.

`write DIR`: a small FLAIR/T1w pair in BIDS layout with a non-trivial geometry (oblique affine,
anisotropic voxels, different qform and sform codes, units, int16 with a slope), and bad volumes.
`compare IN OUT`: checks that OUT (a translation of IN) keeps IN's geometry and is float32 in [0, 1]
with no scaling; prints what differs and exits 1 if anything does.
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (40, 36, 12)


def affine():
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.9, 1.1, 1.3])
    a[:3, 3] = [-20.5, 14.0, 3.25]
    return a


def volume(seed, scale):
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    blob = np.exp(-(((i - 20) / 9.0) ** 2 + ((j - 18) / 8.0) ** 2 + ((k - 6) / 5.0) ** 2))
    return (scale * blob + rng.normal(0, 30, SHAPE) + 200).astype(np.int16)


def save(data, path, dtype=None):
    img = nib.Nifti1Image(data, affine())
    img.set_qform(affine(), code=1)
    img.set_sform(affine(), code=2)
    img.header.set_xyzt_units("mm", "sec")
    if dtype is not None:
        img.header.set_data_dtype(dtype)
    if data.dtype == np.int16:
        img.header.set_slope_inter(2.0, -5.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def write(root):
    anat = root / "bids" / "sub-01" / "ses-1" / "anat"
    save(volume(1, 900), anat / "sub-01_ses-1_FLAIR.nii.gz")
    save(volume(2, -500), anat / "sub-01_ses-1_T1w.nii.gz")
    # Zero above slice 8 (a zero-padded or skull-stripped scan) for `preprocess`'s blank-slice report.
    blank = root / "bids_blank" / "sub-02" / "ses-1" / "anat"
    for contrast, seed in [("FLAIR", 7), ("T1w", 8)]:
        v = volume(seed, 900)
        v[:, :, 8:] = 0
        save(v, blank / f"sub-02_ses-1_{contrast}.nii.gz")
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    nan = volume(3, 900).astype(np.float32)
    nan[20, 18, 5] = np.nan
    save(nan, bad / "nan.nii.gz")
    save(np.full(SHAPE, 7, np.int16), bad / "constant.nii.gz")
    save(volume(4, 900)[:, :, 0], bad / "flat.nii.gz")
    save(np.stack([volume(5, 900)] * 2, axis=-1), bad / "two_volumes.nii.gz")
    save(volume(6, 900)[:20], bad / "small.nii.gz")
    (bad / "junk.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    good = (anat / "sub-01_ses-1_FLAIR.nii.gz").read_bytes()
    (bad / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    save(volume(1, 900)[:, :, :, None], bad / "one_of_4d.nii.gz")


def compare(inp, out):
    a, b = nib.load(inp), nib.load(out)
    ha, hb = a.header, b.header
    problems = []
    if not np.array_equal(a.affine, b.affine):
        problems.append(f"affine {a.affine.tolist()} != {b.affine.tolist()}")
    for key in ["pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units", "dim_info"]:
        if not np.array_equal(ha[key], hb[key]):
            problems.append(f"{key} {ha[key]} != {hb[key]}")
    if not np.array_equal(a.get_qform(), b.get_qform()) or not np.array_equal(a.get_sform(), b.get_sform()):
        problems.append("qform/sform matrices differ")
    if nib.aff2axcodes(a.affine) != nib.aff2axcodes(b.affine):
        problems.append("orientation differs")
    if a.shape[:3] != b.shape or len(b.shape) != 3:
        problems.append(f"shape {a.shape} -> {b.shape}")
    if hb.get_data_dtype() != np.float32:
        problems.append(f"dtype {hb.get_data_dtype()}")
    # A loaded image's header has its scaling reset to NaN (nibabel moves it into the data proxy): read the file's.
    with nib.openers.ImageOpener(out) as f:
        raw = nib.Nifti1Header.from_fileobj(f)
    if float(raw["scl_slope"]) != 1.0 or float(raw["scl_inter"]) != 0.0:
        problems.append(f"scaling {raw['scl_slope']} {raw['scl_inter']}")
    data = b.get_fdata()
    if not (np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1):
        problems.append(f"values outside [0, 1]: {data.min()}..{data.max()}")
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} differences")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
    elif sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
