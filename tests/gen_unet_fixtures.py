"""DiffusionModelUNet and ControlNet parity fixtures, from MONAI 1.6.1 and monai-generative 0.2.3.

For each case and library: build the network with a fixed seed, perturb every parameter (so that the
zero-initialised convs, norms, biases and attention weights all matter), run it, and write
  <out>/<case>-<lib>/state_dict.pt    torch.save(model.state_dict())
  <out>/<case>-<lib>/config.json      the medgen config (the library's own key names)
  <out>/<case>-<lib>/io.safetensors   inputs and outputs
Init cases (ControlNet initialised from a trained UNet, `load_state_dict(strict=False)` as the reference
training script does) write unet.pt, controlnet_before.pt, controlnet_after.pt and the missing/unexpected
key lists. <out>/manifest.json lists everything; the Rust test `parity_unet` reads it.
"""
import argparse
import copy
import json
import os
import sys

import torch
from safetensors.torch import save_file

from fixtures_common import perturb

import monai
from monai.networks.nets import ControlNet as NewControlNet
from monai.networks.nets import DiffusionModelUNet as NewUNet
from generative.networks.nets import ControlNet as OldControlNet
from generative.networks.nets import DiffusionModelUNet as OldUNet

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEED = 2024
BOTH = ("monai", "generative")

with open(os.path.join(ROOT, "configs", "ldm_v0.json")) as f:
    LDM_V0 = json.load(f)["ldm"]["params"]
with open(os.path.join(ROOT, "configs", "controlnet_v0.json")) as f:
    CONTROLNET_V0 = json.load(f)["controlnet"]["params"]


def small(**kw):
    """A small 2D encoder config in MONAI >= 1.4 names."""
    p = dict(spatial_dims=2, in_channels=3, num_res_blocks=1, channels=[16, 32, 32],
             attention_levels=[False, True, True], norm_num_groups=8, num_head_channels=[0, 16, 32])
    p.update(kw)
    return p


COND = dict(with_conditioning=True, cross_attention_dim=24)

# name -> (UNet params (MONAI names, no out_channels), batch, latent HxW, timesteps, context tokens, libs, extra)
# timesteps: a list (one per batch element) or a single-element list broadcast over the batch, as the samplers do.
UNET_CASES = {
    "ldm_v0": (dict(LDM_V0), 2, (20, 28), [999], 77, ("generative",), {}),
    "cond_multihead": (small(**COND, channels=[32, 64, 64], num_head_channels=[0, 16, 32], norm_num_groups=16),
                       2, (16, 16), [10], 5, BOTH, {}),
    "uncond_selfattn": (small(attention_levels=[False, True], channels=[16, 32], num_head_channels=8,
                              num_res_blocks=[1, 2]), 2, (12, 20), [999, 3], 0, BOTH, {}),
    "resblock_updown": (small(**COND, resblock_updown=True, attention_levels=[False, False, True]),
                        2, (16, 24), [500, 1], 7, BOTH, {}),
    "class_embeds": (small(num_class_embeds=5, num_res_blocks=[2, 1, 1]), 3, (8, 8), [250, 251, 252], 0, BOTH,
                     {"class_labels": [4, 0, 2]}),
    "transformer_layers2": (small(**COND, transformer_num_layers=2, num_head_channels=[0, 8, 16]),
                            2, (8, 16), [42], 3, BOTH, {}),
    "upcast_attention": (small(**COND, upcast_attention=True), 1, (8, 8), [700], 4, BOTH, {}),
    "inner_dim_differs": (small(**COND, channels=[16, 48, 48], num_head_channels=[0, 20, 20]), 2, (8, 8), [5], 4,
                          BOTH, {}),
    "residuals": (small(**COND), 2, (16, 16), [900, 100], 6, BOTH, {"residuals": True}),
    "uncond_residuals": (small(num_res_blocks=2), 2, (8, 12), [0], 0, BOTH, {"residuals": True}),
    # Options only MONAI core has.
    "no_fc_cond": (small(**COND, include_fc=False), 2, (8, 8), [30], 4, ("monai",), {}),
    "no_fc_uncond": (small(include_fc=False), 2, (8, 8), [30, 60], 0, ("monai",), {}),
    "combined_linear": (small(**COND, use_combined_linear=True), 2, (8, 8), [30], 4, ("monai",), {}),
    "combined_linear_uncond": (small(use_combined_linear=True), 2, (8, 8), [30, 1], 0, ("monai",), {}),
    "flash": (small(**COND, use_flash_attention=True), 2, (8, 8), [30], 4, ("monai",), {}),
    "dropout_cattn_eval": (small(**COND, dropout_cattn=0.3), 2, (8, 8), [30], 4, BOTH, {}),
    # One context for the whole batch: MONAI's einsum attention broadcasts it (monai-generative's bmm cannot).
    "context_batch1": (small(**COND), 3, (8, 8), [30], 4, ("monai",), {"context_batch": 1}),
    # Volumes (spatial_dims=3): attention over the flattened h*w*d positions, 3-D convs, pooling and upsampling.
    "3d_cond": (small(**COND, spatial_dims=3), 2, (8, 8, 4), [10], 5, BOTH, {}),
    "3d_uncond_updown": (small(spatial_dims=3, resblock_updown=True, num_head_channels=8), 1, (4, 8, 4), [999], 0,
                         BOTH, {}),
    "3d_residuals": (small(spatial_dims=3, num_res_blocks=[1, 2, 1]), 2, (4, 4, 4), [5, 6], 0, BOTH,
                     {"residuals": True}),
    "3d_class_embeds": (small(spatial_dims=3, num_class_embeds=3), 2, (4, 4, 4), [5, 6], 0, BOTH,
                        {"class_labels": [2, 0]}),
    # The layout of the model zoo's 3-D brats_mri_generative_diffusion UNet (attention without output projection),
    # narrowed.
    "3d_brats_layout": (small(spatial_dims=3, in_channels=8, channels=[16, 16, 32], attention_levels=[False, True, True],
                              num_head_channels=[0, 8, 8], num_res_blocks=2, include_fc=False,
                              use_combined_linear=False), 1, (8, 4, 4), [300], 0, ("monai",), {}),
}

# name -> (ControlNet params (MONAI names), batch, latent HxW, timesteps, context tokens, libs, conditioning_scale)
CONTROLNET_CASES = {
    "controlnet_v0": (dict(CONTROLNET_V0), 2, (20, 28), [999], 77, ("generative",), 1.0),
    "cn_cond_multihead": (small(**COND, channels=[32, 64, 64], num_head_channels=[0, 16, 32], norm_num_groups=16,
                                conditioning_embedding_num_channels=[8, 16]), 2, (16, 16), [10], 5, BOTH, 1.0),
    "cn_uncond": (small(conditioning_embedding_num_channels=[16], conditioning_embedding_in_channels=2,
                        num_head_channels=8), 2, (8, 12), [999, 3], 0, BOTH, 1.0),
    "cn_resblock_updown": (small(**COND, resblock_updown=True, conditioning_embedding_num_channels=[8, 8, 16]),
                           2, (8, 8), [500, 1], 7, BOTH, 1.0),
    "cn_class_embeds": (small(num_class_embeds=3, conditioning_embedding_num_channels=[8, 16]), 2, (8, 8), [7, 8],
                        0, BOTH, 1.0),
    "cn_transformer_layers2_scale": (small(**COND, transformer_num_layers=2, conditioning_embedding_num_channels=[8, 16]),
                                     2, (8, 8), [42], 3, BOTH, 0.5),
    "cn_upcast": (small(**COND, upcast_attention=True, conditioning_embedding_num_channels=[8, 16]), 1, (8, 8), [7],
                  4, BOTH, 2.0),
    "cn_no_fc": (small(**COND, include_fc=False, conditioning_embedding_num_channels=[8, 16]), 2, (8, 8), [7], 4,
                 ("monai",), 1.0),
    "cn_combined_linear_uncond": (small(use_combined_linear=True, conditioning_embedding_num_channels=[8, 16]),
                                  2, (8, 8), [7, 9], 0, ("monai",), 1.0),
    "cn_3d_cond": (small(**COND, spatial_dims=3, conditioning_embedding_num_channels=[8, 16]), 1, (4, 8, 4), [7], 4,
                   BOTH, 1.0),
    "cn_3d_uncond_updown": (small(spatial_dims=3, resblock_updown=True, num_head_channels=8,
                                  conditioning_embedding_num_channels=[8, 8, 16]), 2, (4, 4, 4), [7, 900], 0, BOTH,
                            0.5),
}

# ControlNet initialised from a trained UNet: name -> (UNet params, ControlNet extra params, libs)
INIT_CASES = {
    "init_cond": (small(**COND), dict(conditioning_embedding_num_channels=[8, 16]), BOTH),
    "init_uncond": (small(num_head_channels=8), dict(conditioning_embedding_num_channels=[16]), BOTH),
    "init_class_updown": (small(num_class_embeds=4, resblock_updown=True),
                          dict(conditioning_embedding_num_channels=[8, 16]), BOTH),
}

MONAI_ONLY = ("include_fc", "use_combined_linear", "use_flash_attention")


def ctor_params(lib, params):
    p = dict(params)
    if "num_channels" in p:
        p["channels"] = p.pop("num_channels")
    if lib == "generative":
        p["num_channels"] = p.pop("channels")
        for k in MONAI_ONLY:
            assert k not in p, k
    return p


def build_unet(lib, params):
    p = ctor_params(lib, params)
    p.setdefault("out_channels", p["in_channels"])
    return (OldUNet if lib == "generative" else NewUNet)(**p), p


def build_controlnet(lib, params):
    p = ctor_params(lib, params)
    return (OldControlNet if lib == "generative" else NewControlNet)(**p), p


def timesteps_tensor(ts):
    # Half the cases pass float timesteps (MONAI's inferers: torch.Tensor((t,))), half int64 (the reference
    # scripts: .long()); both must give the same embedding.
    return torch.tensor(ts, dtype=torch.int64 if len(ts) % 2 == 0 else torch.float32)


def context_for(params, batch, tokens, gen):
    if not params.get("with_conditioning"):
        return None
    return torch.randn((batch, tokens, params["cross_attention_dim"]), generator=gen)


def write_case(out_dir, name, lib, files, io, cfg):
    d = os.path.join(out_dir, f"{name}-{lib}")
    os.makedirs(d, exist_ok=True)
    for fname, sd in files.items():
        torch.save(sd, os.path.join(d, fname))
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(f"wrote {d}", file=sys.stderr)
    return f"{name}-{lib}"


def unet_cases(args, manifest):
    for name, (params, batch, hw, ts, tokens, libs, extra) in UNET_CASES.items():
        if args.only and name not in args.only:
            continue
        for lib in libs:
            torch.manual_seed(SEED)
            model, ctor = build_unet(lib, params)
            model.eval()
            gen = torch.Generator().manual_seed(SEED + 1)
            perturb(model, gen)
            x = torch.randn((batch, ctor["in_channels"], *hw), generator=gen)
            t = timesteps_tensor(ts)
            io = {"x": x, "timesteps": t}
            kw = {}
            ctx = context_for(params, extra.get("context_batch", batch), tokens, gen)
            if ctx is not None:
                io["context"] = kw["context"] = ctx
            if "class_labels" in extra:
                io["class_labels"] = kw["class_labels"] = torch.tensor(extra["class_labels"], dtype=torch.int64)
            if extra.get("residuals"):
                # Shapes of the skip list, taken from a ControlNet with the same encoder.
                cn_params = {k: v for k, v in ctor.items() if k != "out_channels"}
                cn_params["conditioning_embedding_num_channels"] = [8]
                cn = (OldControlNet if lib == "generative" else NewControlNet)(**cn_params)
                with torch.no_grad():
                    down, mid = cn(x=x, timesteps=t, controlnet_cond=torch.zeros((batch, 1, *hw)),
                                   **({"context": ctx} if ctx is not None else {}))
                res = [torch.randn(r.shape, generator=gen) for r in down]
                kw["down_block_additional_residuals"] = res
                kw["mid_block_additional_residual"] = torch.randn(mid.shape, generator=gen)
                for i, r in enumerate(res):
                    io[f"down_res_{i}"] = r
                io["mid_res"] = kw["mid_block_additional_residual"]
            with torch.no_grad():
                io["output"] = model(x, timesteps=t, **kw)
                if len(ts) == 1 and batch > 1:
                    # The batch-1 timestep broadcast the samplers rely on, against explicit per-element timesteps.
                    io["output_timesteps_expanded"] = model(x, timesteps=t.expand(batch), **kw)
                if lib == "generative" and not params.get("with_conditioning") and "class_labels" not in extra:
                    # MONAI's own converter on this unconditioned old checkpoint, with the default include_fc=True:
                    # it applies the never-used proj_attn. medgen must give the old library's outputs instead.
                    new = NewUNet(**ctor_params("monai", params), out_channels=ctor["out_channels"])
                    new.load_old_state_dict(copy.deepcopy(model.state_dict()))
                    new.eval()
                    io["monai_load_old_state_dict_output"] = new(x, timesteps=t, **kw)
            cfg = {"ldm": {"params": ctor}} if name == "ldm_v0" else ctor
            d = write_case(args.out, name, lib, {"state_dict.pt": model.state_dict()}, io, cfg)
            manifest.append({"kind": "unet", "case": name, "lib": lib, "dir": d,
                             "num_down_res": sum(1 for k in io if k.startswith("down_res_"))})


def controlnet_cases(args, manifest):
    for name, (params, batch, hw, ts, tokens, libs, scale) in CONTROLNET_CASES.items():
        if args.only and name not in args.only:
            continue
        for lib in libs:
            torch.manual_seed(SEED)
            model, ctor = build_controlnet(lib, params)
            model.eval()
            gen = torch.Generator().manual_seed(SEED + 2)
            perturb(model, gen)
            f = 2 ** (len(ctor["conditioning_embedding_num_channels"]) - 1)
            x = torch.randn((batch, ctor["in_channels"], *hw), generator=gen)
            cond = torch.rand((batch, ctor.get("conditioning_embedding_in_channels", 1), *(n * f for n in hw)),
                              generator=gen)
            t = timesteps_tensor(ts)
            io = {"x": x, "timesteps": t, "controlnet_cond": cond}
            kw = {}
            ctx = context_for(params, batch, tokens, gen)
            if ctx is not None:
                io["context"] = kw["context"] = ctx
            if ctor.get("num_class_embeds"):
                io["class_labels"] = kw["class_labels"] = torch.arange(batch, dtype=torch.int64) % ctor["num_class_embeds"]
            with torch.no_grad():
                down, mid = model(x=x, timesteps=t, controlnet_cond=cond, conditioning_scale=scale, **kw)
                for i, r in enumerate(down):
                    io[f"down_{i}"] = r
                io["mid"] = mid
                if lib == "generative" and not params.get("with_conditioning"):
                    # MONAI's ControlNet.load_old_state_dict on an unconditioned old checkpoint: it does not map the
                    # self-attention to_q/k/v, so they stay at their random init (include_fc=False, else KeyError).
                    new = NewControlNet(**ctor_params("monai", params), include_fc=False)
                    new.load_old_state_dict(copy.deepcopy(model.state_dict()))
                    new.eval()
                    d2, m2 = new(x=x, timesteps=t, controlnet_cond=cond, conditioning_scale=scale, **kw)
                    io["monai_load_old_state_dict_mid"] = m2
            cfg = {"controlnet": {"params": ctor}} if name == "controlnet_v0" else ctor
            d = write_case(args.out, name, lib, {"state_dict.pt": model.state_dict()}, io, cfg)
            manifest.append({"kind": "controlnet", "case": name, "lib": lib, "dir": d, "conditioning_scale": scale,
                             "num_down": len(down)})


def init_cases(args, manifest):
    for name, (params, cn_extra, libs) in INIT_CASES.items():
        if args.only and name not in args.only:
            continue
        for lib in libs:
            torch.manual_seed(SEED)
            unet, unet_ctor = build_unet(lib, params)
            gen = torch.Generator().manual_seed(SEED + 3)
            perturb(unet, gen)
            cn, cn_ctor = build_controlnet(lib, dict(params, **cn_extra))
            # The ControlNet's own layers get non-zero values, to show the copy leaves them alone.
            perturb(cn, gen)
            cn.eval()
            before = copy.deepcopy(cn.state_dict())
            result = cn.load_state_dict(unet.state_dict(), strict=False)
            after = cn.state_dict()
            batch, hw = 2, (8, 8)
            f = 2 ** (len(cn_ctor["conditioning_embedding_num_channels"]) - 1)
            x = torch.randn((batch, cn_ctor["in_channels"], *hw), generator=gen)
            cond = torch.rand((batch, 1, hw[0] * f, hw[1] * f), generator=gen)
            t = torch.tensor([11, 500])
            io = {"x": x, "timesteps": t, "controlnet_cond": cond}
            kw = {}
            ctx = context_for(params, batch, 3, gen)
            if ctx is not None:
                io["context"] = kw["context"] = ctx
            if cn_ctor.get("num_class_embeds"):
                io["class_labels"] = kw["class_labels"] = torch.tensor([1, 3])
            with torch.no_grad():
                down, mid = cn(x=x, timesteps=t, controlnet_cond=cond, **kw)
            for i, r in enumerate(down):
                io[f"down_{i}"] = r
            io["mid"] = mid
            files = {"unet.pt": unet.state_dict(), "controlnet_before.pt": before, "controlnet_after.pt": after}
            d = write_case(args.out, name, lib, files, io, {"unet": unet_ctor, "controlnet": cn_ctor})
            manifest.append({"kind": "init", "case": name, "lib": lib, "dir": d, "num_down": len(down),
                             "missing_keys": sorted(result.missing_keys),
                             "unexpected_keys": sorted(result.unexpected_keys)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args()
    args.only = set(args.only.split(",")) if args.only else None
    # Same thread count as the Rust side: the summation order of oneDNN convs can depend on it.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    manifest = []
    unet_cases(args, manifest)
    controlnet_cases(args, manifest)
    init_cases(args, manifest)
    for m in manifest:
        m["versions"] = {"torch": torch.__version__, "monai": monai.__version__}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
