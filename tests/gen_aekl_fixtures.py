"""AutoencoderKL parity fixtures, from MONAI 1.6.1 and monai-generative 0.2.3.

For each case and library: build the network with a fixed seed, perturb every parameter (so
that norms, biases and attention weights all matter), and write
  <out>/<case>-<lib>/state_dict.pt    torch.save(model.state_dict())
  <out>/<case>-<lib>/config.json      the medgen config (the library's own key names)
  <out>/<case>-<lib>/io.safetensors   inputs and every API op's outputs
and <out>/manifest.json listing the cases. The Rust test `parity_aekl` compares against them.
"""
import argparse
import copy
import json
import os
import sys

import torch
from safetensors.torch import save_file

import monai
from monai.networks.nets import AutoencoderKL as NewAEKL
from generative.networks.nets import AutoencoderKL as OldAEKL

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEED = 1234
NOISE_SEED = 4321

with open(os.path.join(ROOT, "configs", "aekl_v0.json")) as f:
    AEKL_V0 = json.load(f)["stage1"]["params"]

# name -> (params in MONAI >= 1.4 names, input shape, libraries)
BOTH = ("monai", "generative")
CASES = {
    "aekl_v0": (dict(AEKL_V0, channels=AEKL_V0["num_channels"]), (1, 1, 160, 224), BOTH),
    "attn_nonlocal": (
        dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16, 32], latent_channels=3,
             num_res_blocks=[1, 2, 1], attention_levels=[False, True, True], norm_num_groups=4,
             with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True),
        (2, 1, 32, 48), BOTH),
    "no_attn": (
        dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[16, 32], latent_channels=2,
             num_res_blocks=1, attention_levels=[False, False], norm_num_groups=8,
             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
        (1, 1, 24, 24), BOTH),
    "odd_groups": (
        dict(spatial_dims=2, in_channels=2, out_channels=3, channels=[10, 15], latent_channels=4,
             num_res_blocks=[2, 1], attention_levels=[False, True], norm_num_groups=5, norm_eps=1e-5,
             with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=False),
        (2, 2, 20, 28), BOTH),
    "convtranspose": (
        dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16, 16], latent_channels=3,
             num_res_blocks=1, attention_levels=[False, False, True], norm_num_groups=4,
             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=True, use_convtranspose=True),
        (1, 1, 32, 32), BOTH),
    "odd_size": (
        dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16], latent_channels=3,
             num_res_blocks=1, attention_levels=[False, True], norm_num_groups=4,
             with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True),
        (1, 1, 33, 35), BOTH),
    # Volumes (spatial_dims=3): 3-D convs, the asymmetric (0, 1) padding per dimension, attention over h*w*d.
    "3d_attn_nonlocal": (
        dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16, 16], latent_channels=3,
             num_res_blocks=[1, 2, 1], attention_levels=[False, False, True], norm_num_groups=4,
             with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True),
        (1, 1, 16, 12, 8), BOTH),
    "3d_convtranspose": (
        dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[8, 16], latent_channels=4,
             num_res_blocks=1, attention_levels=[False, True], norm_num_groups=4,
             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_convtranspose=True),
        (2, 1, 8, 8, 12), BOTH),
    "3d_odd_size": (
        dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16], latent_channels=3,
             num_res_blocks=1, attention_levels=[False, False], norm_num_groups=4,
             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
        (1, 1, 9, 10, 7), BOTH),
    # The model zoo's 3-D brats_mri_generative_diffusion autoencoder layout (no output projection), narrowed.
    "3d_brats_layout": (
        dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16, 32], latent_channels=8,
             num_res_blocks=1, attention_levels=[False, False, False], norm_num_groups=8,
             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, include_fc=False),
        (1, 1, 16, 16, 8), ("monai",)),
    # Options only MONAI core has.
    "no_fc": (
        dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16], latent_channels=3,
             num_res_blocks=1, attention_levels=[False, True], norm_num_groups=4, include_fc=False),
        (1, 1, 16, 24), ("monai",)),
    "combined_linear": (
        dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16], latent_channels=3,
             num_res_blocks=1, attention_levels=[False, True], norm_num_groups=4, use_combined_linear=True),
        (1, 1, 16, 24), ("monai",)),
    "flash": (
        dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16], latent_channels=3,
             num_res_blocks=1, attention_levels=[False, True], norm_num_groups=4, use_flash_attention=True),
        (1, 1, 16, 24), ("monai",)),
}


def build(lib, params):
    p = dict(params)
    p.pop("num_channels", None)
    if lib == "generative":
        p["num_channels"] = p.pop("channels")
        for k in ("include_fc", "use_combined_linear"):
            assert k not in p, k
        return OldAEKL(**p), p
    return NewAEKL(**p), p


def params_new(params):
    p = dict(params)
    p.pop("num_channels", None)
    return p


def perturb(model, gen):
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args()
    # Same thread count as the Rust side: the summation order of oneDNN convs can depend on it.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    manifest = []
    for name, (params, shape, libs) in CASES.items():
        if only and name not in only:
            continue
        for lib in libs:
            torch.manual_seed(SEED)
            model, ctor = build(lib, params)
            model.eval()
            gen = torch.Generator().manual_seed(SEED + 1)
            perturb(model, gen)
            x = torch.randn(shape, generator=gen)
            out = {"x": x}
            with torch.no_grad():
                mu, sigma = model.encode(x)
                out["z_mu"], out["z_sigma"] = mu, sigma
                z = torch.randn(mu.shape, generator=gen)
                out["z"] = z
                out["decoded"] = model.decode(z)
                out["reconstruction"] = model.reconstruct(x)
                out["decode_stage_2_outputs"] = model.decode_stage_2_outputs(z)
                torch.manual_seed(NOISE_SEED)
                rec, fmu, fsig = model(x)
                out["forward_reconstruction"], out["forward_z_mu"], out["forward_z_sigma"] = rec, fmu, fsig
                # randn_like keeps the input's memory format (conv outputs may be channels-last),
                # which decides where each draw lands: use the standard layout medgen reads.
                mu_c, sigma_c = mu.contiguous(), sigma.contiguous()
                torch.manual_seed(NOISE_SEED)
                out["sampling"] = model.sampling(mu_c, sigma_c)
                torch.manual_seed(NOISE_SEED)
                out["encode_stage_2_inputs"] = model.encode_stage_2_inputs(x)
                torch.manual_seed(NOISE_SEED)
                out["randn_like_z_sigma"] = torch.randn_like(sigma_c)
                out["forward_is_channels_last"] = torch.tensor(sigma.is_contiguous(memory_format=torch.channels_last) and not sigma.is_contiguous())
            if lib == "generative" and any("proj_attn" in k for k in model.state_dict()):
                # What MONAI 1.6's own converter makes of this old checkpoint: it copies the never-applied
                # proj_attn into out_proj, so its outputs differ from the old library's. medgen must not.
                new = NewAEKL(**params_new(params))
                new.load_old_state_dict(copy.deepcopy(model.state_dict()))
                new.eval()
                with torch.no_grad():
                    out["monai_load_old_state_dict_reconstruction"] = new.reconstruct(x)
            d = os.path.join(args.out, f"{name}-{lib}")
            os.makedirs(d, exist_ok=True)
            torch.save(model.state_dict(), os.path.join(d, "state_dict.pt"))
            save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "io.safetensors"))
            # The reference layout for aekl_v0; bare parameters elsewhere.
            cfg = {"stage1": {"params": ctor}} if name == "aekl_v0" else ctor
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f, indent=1)
            manifest.append({"case": name, "lib": lib, "dir": f"{name}-{lib}", "noise_seed": NOISE_SEED,
                             "versions": {"torch": torch.__version__, "monai": monai.__version__}})
            print(f"wrote {d}", file=sys.stderr)
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
