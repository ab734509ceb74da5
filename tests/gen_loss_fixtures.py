"""Parity fixtures for the AutoencoderKL training losses: PatchDiscriminator (MONAI 1.6.1 and monai-generative 0.2.3),
PatchAdversarialLoss and the reference training's KL term.

  <out>/discriminator/manifest.json                      the cases
  <out>/discriminator/<case>-<lib>/config.json           the constructor arguments (the library's own names)
  <out>/discriminator/<case>-<lib>/init_state_dict.pt    the weights right after torch.manual_seed(SEED); construction
  <out>/discriminator/<case>-<lib>/state_dict.pt         perturbed weights and BatchNorm buffers (what is loaded)
  <out>/discriminator/<case>-<lib>/io.safetensors        inputs, eval and train outputs, gradients, buffers after
  <out>/adversarial.json + adversarial.safetensors       every criterion x reduction x target x for_discriminator
  <out>/kl.json + kl.safetensors                         KL values and gradients
The Rust test `parity_losses` compares against them.
"""
import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import monai_compat  # noqa: F401  (before any `generative` import)

import torch
from safetensors.torch import save_file

import monai
from monai.losses import PatchAdversarialLoss as NewLoss
from monai.networks.nets import PatchDiscriminator as NewD
from generative.losses import PatchAdversarialLoss as OldLoss
from generative.networks.nets import PatchDiscriminator as OldD

SEED = 1234
NOISE_SEED = 4321
BOTH = ("monai", "generative")

# name -> (params in MONAI names, input shape, libraries). monai-generative 0.2.3 accepts only string norms.
CASES = {
    "reference": (dict(spatial_dims=2, channels=128, num_layers_d=3, in_channels=1, out_channels=1),
                  (2, 1, 160, 224), ("generative",)),
    "small": (dict(spatial_dims=2, channels=8, num_layers_d=3, in_channels=2), (3, 2, 64, 48), BOTH),
    "instance": (dict(spatial_dims=2, channels=6, num_layers_d=2, in_channels=1, norm="INSTANCE"),
                 (2, 1, 40, 40), BOTH),
    "instance_affine": (dict(spatial_dims=2, channels=6, num_layers_d=2, in_channels=1,
                             norm=("INSTANCE", {"affine": True, "eps": 1e-3})), (2, 1, 40, 36), ("monai",)),
    "layers0": (dict(spatial_dims=2, channels=4, num_layers_d=0, in_channels=1), (2, 1, 16, 20), BOTH),
    "layers1": (dict(spatial_dims=2, channels=4, num_layers_d=1, in_channels=1, out_channels=2), (2, 1, 16, 20), BOTH),
    "layers5": (dict(spatial_dims=2, channels=4, num_layers_d=5, in_channels=1), (2, 1, 128, 96), BOTH),
    "last_k1": (dict(spatial_dims=2, channels=8, num_layers_d=2, in_channels=1, last_conv_kernel_size=1),
                (2, 1, 32, 28), BOTH),
    "last_k3": (dict(spatial_dims=2, channels=8, num_layers_d=2, in_channels=1, last_conv_kernel_size=3),
                (2, 1, 32, 28), BOTH),
    "relu_bias_pad2_k3": (dict(spatial_dims=2, channels=8, num_layers_d=2, in_channels=1, activation="RELU", bias=True,
                               padding=2, kernel_size=3), (2, 1, 24, 20), BOTH),
    "leaky01": (dict(spatial_dims=2, channels=8, num_layers_d=2, in_channels=1,
                     activation=("LEAKYRELU", {"negative_slope": 0.1})), (2, 1, 24, 24), BOTH),
    "batch_args": (dict(spatial_dims=2, channels=8, num_layers_d=2, in_channels=1,
                        norm=("BATCH", {"eps": 1e-3, "momentum": 0.3})), (4, 1, 24, 24), ("monai",)),
    "momentum_none": (dict(spatial_dims=2, channels=8, num_layers_d=2, in_channels=1,
                           norm=("BATCH", {"momentum": None})), (2, 1, 24, 24), ("monai",)),
    "no_act_no_norm": (dict(spatial_dims=2, channels=8, num_layers_d=2, in_channels=1, activation=None, norm=None),
                       (2, 1, 24, 24), ("monai",)),
    "dropout": (dict(spatial_dims=2, channels=8, num_layers_d=2, in_channels=1, dropout=0.3), (2, 1, 32, 32), BOTH),
    "dims3": (dict(spatial_dims=3, channels=4, num_layers_d=2, in_channels=1, padding=[1, 2, 1]),
              (2, 1, 16, 20, 12), BOTH),
    "dims1": (dict(spatial_dims=1, channels=4, num_layers_d=2, in_channels=2), (3, 2, 40), BOTH),
}


def build(lib, params):
    p = dict(params)
    if lib == "generative":
        p["num_channels"] = p.pop("channels")
        return OldD(**p), p
    return NewD(**p), p


def perturb(model, gen):
    """Moves every weight and buffer away from its init so that biases, affine norms and running stats matter."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(5)
            elif name.endswith("running_var"):
                t.mul_(torch.exp(0.3 * torch.randn(t.shape, generator=gen)))
            elif t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)


def buffers(model, prefix):
    return {f"{prefix}.{k}": v.clone() for k, v in model.state_dict().items()
            if "running_" in k or "num_batches_tracked" in k}


def discriminator(out):
    root = os.path.join(out, "discriminator")
    os.makedirs(root, exist_ok=True)
    manifest = []
    for name, (params, shape, libs) in CASES.items():
        for lib in libs:
            torch.manual_seed(SEED)
            model, ctor = build(lib, params)
            init_sd = {k: v.clone() for k, v in model.state_dict().items()}
            gen = torch.Generator().manual_seed(SEED + 1)
            perturb(model, gen)
            d = os.path.join(root, f"{name}-{lib}")
            os.makedirs(d, exist_ok=True)
            torch.save(init_sd, os.path.join(d, "init_state_dict.pt"))
            torch.save(model.state_dict(), os.path.join(d, "state_dict.pt"))
            x = torch.randn(shape, generator=gen)
            x2 = torch.randn(shape, generator=gen)
            io = {"x": x, "x2": x2}
            model.eval()
            with torch.no_grad():
                for i, t in enumerate(model(x)):
                    io[f"eval.{i}"] = t
            # Train mode: batch statistics, running stats updated, dropout drawn from the global generator.
            model.train()
            xg = x.clone().requires_grad_(True)
            torch.manual_seed(NOISE_SEED)
            outs = model(xg)
            g = torch.randn(outs[-1].shape, generator=gen)
            io["g"] = g
            (outs[-1] * g).sum().backward()
            for i, t in enumerate(outs):
                io[f"train.{i}"] = t.detach()
            io["grad.x"] = xg.grad
            for k, p in model.named_parameters():
                io[f"grad.{k}"] = p.grad
            io.update(buffers(model, "after1"))
            torch.manual_seed(NOISE_SEED + 1)
            with torch.no_grad():
                for i, t in enumerate(model(x2)):
                    io[f"train2.{i}"] = t
            io.update(buffers(model, "after2"))
            model.eval()
            with torch.no_grad():
                for i, t in enumerate(model(x)):
                    io[f"eval2.{i}"] = t
            save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(ctor, f, indent=1)
            manifest.append({"case": name, "lib": lib, "dir": f"{name}-{lib}", "seed": SEED, "noise_seed": NOISE_SEED,
                             "outputs": len(outs),
                             "versions": {"torch": torch.__version__, "monai": monai.__version__}})
            print(f"wrote {d}", file=sys.stderr)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def special(t):
    """Logits at the kinks and saturations: 0 (leaky ReLU), +-20 (tanh = +-1: hinge ties), +-200 (sigmoid = 0 or 1:
    BCE's clamped log)."""
    flat = t.view(-1)
    flat[:5] = torch.tensor([0.0, 20.0, -20.0, 200.0, -200.0])
    return t


def adversarial(out):
    gen = torch.Generator().manual_seed(SEED + 2)
    inputs = {
        "single": [special(torch.randn(2, 1, 6, 7, generator=gen) * 2)],
        "list": [special(torch.randn(2, 1, 6, 7, generator=gen) * 2), torch.randn(2, 1, 3, 4, generator=gen) * 2],
    }
    tensors = {f"in.{k}.{i}": t for k, ts in inputs.items() for i, t in enumerate(ts)}
    cases = []
    variants = [("least_squares", False), ("least_squares", True), ("bce", False), ("hinge", False)]
    for lib, cls in (("monai", NewLoss), ("generative", OldLoss)):
        for criterion, no_act in variants:
            for reduction in ("mean", "sum", "none"):
                loss_fn = cls(reduction=reduction, criterion=criterion, no_activation_leastsq=no_act)
                for real in (True, False):
                    for for_disc in (True, False):
                        for kind, ts in inputs.items():
                            name = f"{lib}.{criterion}{'_noact' if no_act else ''}.{reduction}.real{int(real)}" \
                                   f".disc{int(for_disc)}.{kind}"
                            xs = [t.clone().requires_grad_(True) for t in ts]
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                value = loss_fn(xs if kind == "list" else xs[0], target_is_real=real,
                                                for_discriminator=for_disc)
                            values = value if isinstance(value, list) else [value]
                            if reduction == "none":
                                ws = [torch.randn(v.shape, generator=gen) for v in values]
                                total = sum((v * w).sum() for v, w in zip(values, ws))
                                tensors.update({f"{name}/w.{i}": w for i, w in enumerate(ws)})
                            else:
                                total = value
                            total.backward()
                            tensors.update({f"{name}/value.{i}": v.detach() for i, v in enumerate(values)})
                            tensors.update({f"{name}/grad.{i}": x.grad for i, x in enumerate(xs)})
                            cases.append({"name": name, "lib": lib, "criterion": criterion,
                                          "no_activation_leastsq": no_act, "reduction": reduction,
                                          "target_is_real": real, "for_discriminator": for_disc, "inputs": kind,
                                          "values": len(values), "list_returned": isinstance(value, list)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "adversarial.safetensors"))
    with open(os.path.join(out, "adversarial.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(f"wrote {len(cases)} adversarial cases", file=sys.stderr)


def kl(out):
    gen = torch.Generator().manual_seed(SEED + 3)
    shapes = {"latent_2d": (2, 3, 20, 28), "batch1": (1, 3, 8, 8), "small_sigma": (4, 3, 5, 7),
              "latent_3d": (2, 3, 4, 5, 6)}
    tensors, cases = {}, []
    for name, shape in shapes.items():
        mu = torch.randn(shape, generator=gen)
        log_sigma = torch.randn(shape, generator=gen) * (3.0 if name == "small_sigma" else 0.5)
        sigma = torch.exp(log_sigma)
        mu_g, sigma_g = mu.clone().requires_grad_(True), sigma.clone().requires_grad_(True)
        # The reference training loop's lines (2D); the 3D tutorials' dims for 5D latents.
        dims = list(range(1, len(shape)))
        kl_loss = 0.5 * torch.sum(mu_g.pow(2) + sigma_g.pow(2) - torch.log(sigma_g.pow(2)) - 1, dim=dims)
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        kl_loss.backward()
        tensors.update({f"{name}/z_mu": mu, f"{name}/z_sigma": sigma, f"{name}/value": kl_loss.detach(),
                        f"{name}/grad.z_mu": mu_g.grad, f"{name}/grad.z_sigma": sigma_g.grad})
        cases.append({"name": name, "dims": dims})
    save_file(tensors, os.path.join(out, "kl.safetensors"))
    with open(os.path.join(out, "kl.json"), "w") as f:
        json.dump(cases, f, indent=1)
    print(f"wrote {len(cases)} KL cases", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # Same thread count as the Rust side: the summation order of the CPU kernels can depend on it.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    discriminator(args.out)
    adversarial(args.out)
    kl(args.out)


if __name__ == "__main__":
    main()
