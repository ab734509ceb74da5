"""LPIPS / PerceptualLoss parity fixtures, from lpips 0.1.4 and MONAI 1.6.1.

No ImageNet backbone ships offline, so each network is `lpips.LPIPS(net=..., pretrained=True, pnet_rand=True)`: the
real v0.1 lin heads from the lpips wheel on a random torchvision trunk (fixed seed, biases perturbed so that they
matter). Nothing may be downloaded: TORCH_HOME points at an empty temp dir, torch.hub's download functions and socket
connections raise, and the temp dir must still be empty at the end.

For each network, <out>/<net>/ holds
  backbone.pt       torch.save of the torchvision model's state dict: squeezenet1_1 whole (`features.*` and
                    `classifier.*`, as the real `squeezenet1_1-b8a52dc0.pth`), alexnet and vgg16 `features.*` only
  lpips_full.pt     torch.save(lpips_model.state_dict()) (`net.sliceK.N.*`, `lin*`, `lins.*`, `scaling_layer.*`)
  io.safetensors    inputs, LPIPS values (per layer too), MONAI PerceptualLoss values and input gradients
and <out>/manifest.json lists them with the path of the wheel's lin-head file, which the Rust test reads directly.
"""
import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings

TORCH_HOME = tempfile.mkdtemp(prefix="medgen-lpips-torch-home-")
os.environ["TORCH_HOME"] = TORCH_HOME


def _no_network(*args, **kwargs):
    raise RuntimeError("gen_lpips_fixtures: network access attempted (an ImageNet download?)")


socket.socket.connect = _no_network
socket.create_connection = _no_network

import torch  # noqa: E402
import torch.hub  # noqa: E402

torch.hub.load_state_dict_from_url = _no_network
torch.hub.download_url_to_file = _no_network

import torchvision  # noqa: E402
import torchvision.models  # noqa: E402
import lpips  # noqa: E402
import monai  # noqa: E402
import monai.losses.perceptual as monai_perceptual  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SEED = 20240611
NETS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def build(net):
    """lpips.LPIPS with a random trunk; returns it and the torchvision model the trunk's modules came from."""
    tv_name = NETS[net]
    original = getattr(torchvision.models, tv_name)
    captured = []

    def capture(*args, **kwargs):
        assert kwargs.get("pretrained") is False, f"lpips asked torchvision for pretrained weights: {kwargs}"
        m = original(*args, **kwargs)
        captured.append(m)
        return m

    # lpips calls `tv.<name>(pretrained=not pnet_rand)` through the torchvision.models module attribute.
    setattr(torchvision.models, tv_name, capture)
    try:
        torch.manual_seed(SEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(pretrained=True, net=net, version="0.1", pnet_rand=True, verbose=False)
    finally:
        setattr(torchvision.models, tv_name, original)
    assert len(captured) == 1
    tv_model = captured[0]
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        # torchvision zero-initialises the vgg16/squeezenet biases: perturb them so that loading them is tested.
        for name, p in tv_model.features.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    # The trunk's slices hold the very modules of tv_model.features.
    first = next(iter(model.net.slice1.children()))
    assert first is tv_model.features[0]
    assert not any(p.requires_grad for p in model.net.parameters())
    return model, tv_model, gen


FAKE_3D_SEED = 99


def lin_path(net):
    return os.path.join(os.path.dirname(os.path.abspath(lpips.__file__)), "weights", "v0.1", f"{net}.pth")


def monai_loss(net, model, **kw):
    """MONAI's PerceptualLoss with our LPIPS injected in place of the one it would build (which downloads)."""

    def inject(**kwargs):
        assert kwargs == {"pretrained": True, "net": net, "verbose": False}, kwargs
        return model

    original = monai_perceptual.LPIPS
    monai_perceptual.LPIPS = inject
    try:
        loss = monai.losses.PerceptualLoss(network_type=net, **({"spatial_dims": 2} | kw))
    finally:
        monai_perceptual.LPIPS = original
    assert loss.perceptual_function is model
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # Same thread count as the Rust side: the summation order of oneDNN convs can depend on it.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    manifest = []
    for net in NETS:
        model, tv_model, gen = build(net)
        wheel = torch.load(lin_path(net), map_location="cpu")
        for k, v in wheel.items():
            assert torch.equal(model.state_dict()[k], v), f"{net}: {k} is not the wheel's"
        out = {}
        # LPIPS itself on 3-channel images in [-1, 1] (what it expects).
        x0 = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
        x1 = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
        out["lpips_in0"], out["lpips_in1"] = x0, x1
        x0, x1 = x0.clone().requires_grad_(True), x1.clone().requires_grad_(True)
        val, layers = model(x0, x1, retPerLayer=True)
        val.sum().backward()
        out["lpips_value"] = val.detach()
        for k, r in enumerate(layers):
            out[f"lpips_layer{k}"] = r.detach()
        out["lpips_grad_in0"], out["lpips_grad_in1"] = x0.grad, x1.grad

        # An odd size, where squeezenet's ceil_mode pooling and alexnet's floor pooling both round (66 -> 32 -> 16
        # vs 15 in squeezenet; 93 -> 46 -> 23 vs 22).
        z0 = torch.rand(1, 3, 66, 93, generator=gen) * 2 - 1
        z1 = torch.rand(1, 3, 66, 93, generator=gen) * 2 - 1
        out["odd_in0"], out["odd_in1"] = z0, z1
        z0 = z0.clone().requires_grad_(True)
        odd = model(z0, z1)
        odd.sum().backward()
        out["odd_value"], out["odd_grad_in0"] = odd.detach(), z0.grad

        # MONAI's PerceptualLoss as the reference AEKL training uses it: one-channel [0, 1] images, 160x224.
        loss_fn = monai_loss(net, model)
        x = torch.rand(2, 1, 160, 224, generator=gen)
        y = torch.rand(2, 1, 160, 224, generator=gen)
        out["monai_input"], out["monai_target"] = x, y
        xg = x.clone().requires_grad_(True)
        loss = loss_fn(xg, y)
        loss.backward()
        out["monai_loss"], out["monai_grad_input"] = loss.detach(), xg.grad
        with torch.no_grad():
            # The quirks, checked here and recorded for the Rust side: no [-1, 1] rescale (normalize=False) and a
            # one-channel image broadcast by the ScalingLayer, the same as repeating it to three channels.
            assert torch.equal(loss, torch.mean(model(x, y, normalize=False)))
            assert torch.equal(loss, torch.mean(model(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))))
            out["monai_loss_if_normalized"] = torch.mean(model(x, y, normalize=True))

        # Volumes: MONAI's 2.5-D loss (is_fake_3d, its default for spatial_dims=3), slices drawn by torch.randperm
        # from the global generator, seeded here and on the Rust side.
        loss3 = monai_loss(net, model, spatial_dims=3, is_fake_3d=True, fake_3d_ratio=0.3)
        v = torch.rand(1, 1, 32, 40, 36, generator=gen)
        w = torch.rand(1, 1, 32, 40, 36, generator=gen)
        out["fake3d_input"], out["fake3d_target"] = v, w
        vg = v.clone().requires_grad_(True)
        torch.manual_seed(FAKE_3D_SEED)
        l3 = loss3(vg, w)
        l3.backward()
        out["fake3d_loss"], out["fake3d_grad_input"] = l3.detach(), vg.grad

        d = os.path.join(args.out, net)
        os.makedirs(d, exist_ok=True)
        backbone = tv_model.state_dict()
        if net != "squeeze":
            # alexnet's and vgg16's classifiers are 0.2 and 0.5 GB: the squeeze file keeps its classifier.* entries,
            # which is what tests that they are dropped; these two are the features-only files a user may also make.
            backbone = {k: v for k, v in backbone.items() if k.startswith("features.")}
        torch.save(backbone, os.path.join(d, "backbone.pt"))
        torch.save(model.state_dict(), os.path.join(d, "lpips_full.pt"))
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "io.safetensors"))
        manifest.append({
            "net": net, "dir": net, "lin_weights": lin_path(net), "torchvision_model": NETS[net],
            "fake_3d": {"seed": FAKE_3D_SEED, "ratio": 0.3},
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "lpips": getattr(lpips, "__version__", "0.1.4"), "monai": monai.__version__},
        })
        print(f"wrote {d}: lpips {val.detach().flatten().tolist()}, monai {loss.item():.6f}", file=sys.stderr)
    leftovers = [os.path.join(r, f) for r, _, fs in os.walk(TORCH_HOME) for f in fs]
    assert not leftovers, f"something was written to TORCH_HOME: {leftovers}"
    shutil.rmtree(TORCH_HOME)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
