"""RadImageNet ResNet50 parity fixtures (the FID feature network, reference-repo.md §5.2).

The real weights (`RadImageNet-ResNet50_notop.pth`, torch.hub "Warvito/radimagenet-models") do not ship offline, so
this builds the same network here, a Keras-style ResNet50 with the hub model's attribute names (hence its state-dict
keys), gives it random weights with a fixed seed, and writes
  <out>/state_dict.pt     torch.save(model.state_dict()) (the zip format of the hub's .pth)
  <out>/io.safetensors    input images and the network's outputs
  <out>/manifest.json     the cases and versions
The Rust test `parity_resnet` loads the state dict through medgen's loader and compares.

Every BatchNorm's running statistics are set from a train-mode pass over preprocessed images, then jittered, so that
the network is well conditioned (as trained weights are) and every statistic matters to the outputs.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixtures_common import perturb  # noqa: E402

SEED = 2024
EPS = 1.001e-5


def bn(channels, momentum=0.99):
    return nn.BatchNorm2d(channels, eps=EPS, momentum=momentum)


class Bottleneck(nn.Module):
    """Keras' bottleneck: the stride is in the first 1x1 conv; every conv has a bias."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=True)
        self.bn1 = bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=True)
        self.bn2 = bn(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=True)
        self.bn3 = bn(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(y + skip)


class ResNet50(nn.Module):
    """The hub's `ResNet50`: conv1/bn1/relu/maxpool, layer1..layer4, no head. Attribute names are the hub's."""

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = bn(64, momentum=0.01)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(64, layers[0], 1)
        self.layer2 = self._stage(128, layers[1], 2)
        self.layer3 = self._stage(256, layers[2], 2)
        self.layer4 = self._stage(512, layers[3], 2)

    def _stage(self, planes, blocks, stride):
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=True), bn(out))
        mods = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        mods += [Bottleneck(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def reference_preprocess(images):
    """compute_fid.py's steps, verbatim in effect (the `if image.shape[1]` test is always true)."""
    image = images.clone()
    if image.shape[1]:
        image = image.repeat(1, 3, 1, 1)
    image = image[:, [2, 1, 0], ...]
    image[:, 0, ...] -= 0.406
    image[:, 1, ...] -= 0.456
    image[:, 2, ...] -= 0.485
    return image


def reference_features(net, images):
    with torch.no_grad():
        return net(reference_preprocess(images)).mean([2, 3])


def smooth_images(gen, b, h, w):
    """Images in [0, 1] with some structure (a blurred random field plus noise), closer to MRI slices than noise."""
    coarse = torch.rand(b, 1, max(h // 16, 2), max(w // 16, 2), generator=gen)
    field = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    noise = torch.rand(b, 1, h, w, generator=gen)
    return (0.8 * field + 0.2 * noise).clamp(0, 1)


def calibrate(model, gen):
    """Running statistics from one train-mode pass (momentum 1: the batch statistics), then jittered."""
    x = reference_preprocess(smooth_images(gen, 4, 96, 128))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    for m, mom in zip(bns, saved):
        m.momentum = mom
        with torch.no_grad():
            std = m.running_var.sqrt()
            m.running_mean.add_(0.1 * std * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.mul_(torch.exp(0.2 * torch.randn(m.running_var.shape, generator=gen)))
            m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=gen)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # Same thread count as the Rust side: the summation order of oneDNN convs can depend on it.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = ResNet50()
    perturb(model, gen)
    calibrate(model, gen)
    model.eval()

    sd = model.state_dict()
    n_float = sum(v.numel() for v in sd.values() if v.is_floating_point())
    assert n_float == 23_587_712, n_float  # Keras' ResNet50 (include_top=False), moving statistics included
    assert len(sd) == 53 * 2 + 53 * 5, len(sd)

    out = {}
    # The reference setting: (batch, 1, 160, 224) images in [0, 1]; layer4 is 2048 x 5 x 7.
    images = smooth_images(gen, 2, 160, 224)
    out["images"] = images
    with torch.no_grad():
        out["layer4"] = model(reference_preprocess(images))
    out["features"] = reference_features(model, images)
    assert out["layer4"].shape == (2, 2048, 5, 7)
    # Odd sizes (every stride rounds up), uniform noise.
    odd = torch.rand(3, 1, 37, 53, generator=gen)
    out["odd_images"] = odd
    out["odd_features"] = reference_features(model, odd)
    # The network alone, on an arbitrary 3-channel input.
    raw = torch.randn(1, 3, 64, 96, generator=gen)
    out["raw_input"] = raw
    with torch.no_grad():
        out["raw_layer4"] = model(raw)

    torch.save(sd, os.path.join(args.out, "state_dict.pt"))
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(args.out, "io.safetensors"))
    manifest = {
        "cases": {"reference": [2, 1, 160, 224], "odd": [3, 1, 37, 53], "raw": [1, 3, 64, 96]},
        "keys": len(sd),
        "versions": {"torch": torch.__version__},
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    feats = out["features"]
    print(f"wrote {args.out}: features mean {feats.mean():.4f} std {feats.std():.4f} max {feats.abs().max():.4f}, "
          f"layer4 max {out['layer4'].abs().max():.4f}, fraction > 0 {(out['layer4'] > 0).float().mean():.3f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
