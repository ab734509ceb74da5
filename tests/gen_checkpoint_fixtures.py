"""torch.save reader fixtures: every layout and dtype a state dict or training checkpoint can
take, plus files the reader must refuse. Expected tensors go to expected.safetensors, written
by the `safetensors` package, under "<file stem>/<key>".
"""
import argparse
import collections
import glob
import os

import torch
from safetensors.torch import save_file

import lpips


class RunsCode:
    """Unpickling this under Python's torch.load(weights_only=False) calls os.system."""

    def __reduce__(self):
        return (os.system, ("echo medgen-test-should-never-run",))


class EvalsCode:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def dtypes_dict():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g)
    return collections.OrderedDict(
        f32=f,
        f64=f.double() * 3,
        f16=f.half(),
        bf16=f.bfloat16(),
        i64=torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4) * 1000003,
        i32=torch.arange(-6, 6, dtype=torch.int32),
        i16=torch.arange(-6, 6, dtype=torch.int16),
        i8=torch.arange(-6, 6, dtype=torch.int8),
        u8=torch.arange(0, 250, 10, dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.ones(2, 2) * 7),
    )


def views_dict():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return collections.OrderedDict(
        base=base,
        transposed=base.t(),
        slice=base[1:3, 2:5],
        shared=base.view(-1)[5:9],
        strided=base[::2, ::3],
        expanded=torch.arange(3.0).reshape(3, 1).expand(3, 4),
    )


def small_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Conv1d(3, 2, 1))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    out = m[1](m[0](torch.randn(5, 4)))
    out.sum().backward()
    opt.step()
    return m, opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    expected = {}

    def expect(stem, sd):
        for k, v in sd.items():
            expected[f"{stem}/{k}"] = v.detach().clone().contiguous()

    d = dtypes_dict()
    torch.save(d, f"{out}/dtypes.pt")
    expect("dtypes", d)
    torch.save(d, f"{out}/dtypes_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(d, f"{out}/dtypes_proto4.pt", pickle_protocol=4)

    v = views_dict()
    torch.save(v, f"{out}/views.pt")
    torch.save(v, f"{out}/views_legacy.pt", _use_new_zipfile_serialization=False)
    expect("views", v)

    m, opt = small_model()
    sd = m.state_dict()
    expect("model", sd)
    torch.save(sd, f"{out}/model.pt")  # an OrderedDict with _metadata, as MONAI users save
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": opt.state_dict(), "best_loss": 0.25, "name": "run"},
               f"{out}/training.pt")
    torch.save({"epoch": 3, "diffusion": sd, "optimizer": opt.state_dict(), "best_loss": 0.25}, f"{out}/ldm_ckpt.pt")
    torch.save({"state_dict": collections.OrderedDict((f"module.{k}", t) for k, t in sd.items())},
               f"{out}/dataparallel.pt")
    torch.save({"model_a": sd, "model_b": sd}, f"{out}/two_models.pt")
    torch.save({"outer": {"ema": sd}}, f"{out}/nested_key.pt")

    torch.save({"w": torch.ones(2), "evil": RunsCode()}, f"{out}/malicious_system.pt")
    torch.save({"w": torch.ones(2), "evil": RunsCode()}, f"{out}/malicious_system_proto4.pt", pickle_protocol=4)
    torch.save({"w": torch.ones(2), "evil": EvalsCode()}, f"{out}/malicious_eval_legacy.pt",
               _use_new_zipfile_serialization=False)
    torch.save(m, f"{out}/whole_module.pt")  # a pickled nn.Module, not a state dict

    # The lpips wheel's heads are legacy-format files (torch.save without the zip container).
    wdir = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1")
    with open(f"{out}/lpips_dir.txt", "w") as f:
        f.write(wdir)
    for p in sorted(glob.glob(os.path.join(wdir, "*.pth"))):
        stem = "lpips_" + os.path.basename(p)[:-4]
        with open(p, "rb") as fh:
            assert fh.read(1) == b"\x80", f"{p} is expected to be a legacy (non-zip) file"
        expect(stem, torch.load(p, map_location="cpu", weights_only=True))

    save_file(expected, f"{out}/expected.safetensors")


if __name__ == "__main__":
    main()
