"""CLIP text encoder parity fixtures, from Hugging Face transformers' `CLIPTextModel`.

Each case is a Hugging Face `text_encoder` folder as a Stable Diffusion repository ships it, plus the reference
inputs and outputs:
  <out>/<case>/config.json                      the model's config (`save_pretrained`)
  <out>/<case>/model.safetensors                `save_pretrained` (transformers 5.x: keys without `text_model.`)
     or <out>/<case>/pytorch_model.bin          transformers 4.x layout: `text_model.` prefix and the int64
                                                `text_model.embeddings.position_ids` buffer, written with torch.save
  <out>/<case>/io.safetensors                   ids.N (int64), and for each batch N:
                                                  last_hidden_state.N       HF `last_hidden_state`
                                                  penultimate.N             HF `hidden_states[-2]` (raw)
                                                  penultimate_ln.N          final_layer_norm(hidden_states[-2])
                                                  last_hidden_state_sdpa.N  (one case) the same with sdpa attention
<out>/manifest.json lists the cases; the Rust test `parity_clip` reads it. The references use the eager attention.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

from fixtures_common import perturb

import transformers
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

SEED = 77
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=0)
# stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower, last layer removed).
SD21 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                   patch_size=16)


def input_batches(vocab, max_pos, gen):
    """Tokenizer-like rows (BOS = vocab-2, EOS = vocab-1, padded with 0 as SD-2.x or with EOS as SD-1.x), random ids
    covering the whole range, and a sequence shorter than max_position_embeddings."""
    bos, eos = vocab - 2, vocab - 1

    def row(n_words, pad):
        words = torch.randint(0, vocab - 2, (n_words,), generator=gen).tolist()
        r = [bos] + words + [eos]
        return r + [pad] * (max_pos - len(r))

    b0 = torch.tensor([row(5, 0), row(30, eos)], dtype=torch.int64)
    b1 = torch.randint(0, vocab, (3, max_pos), generator=gen)
    b1[0, 0], b1[1, -1], b1[2, 7] = vocab - 1, vocab - 1, 0
    b2 = torch.tensor([row(12, 0)[:20]], dtype=torch.int64)
    return [b0, b1, b2]


def reference(text_model, batches):
    """HF's outputs for each batch: last_hidden_state, hidden_states[-2] and diffusers' clip_skip=1 output."""
    io = {}
    with torch.no_grad():
        for i, ids in enumerate(batches):
            out = text_model(input_ids=ids, output_hidden_states=True)
            assert len(out.hidden_states) == text_model.config.num_hidden_layers + 1
            io[f"ids.{i}"] = ids
            io[f"last_hidden_state.{i}"] = out.last_hidden_state
            io[f"penultimate.{i}"] = out.hidden_states[-2]
            io[f"penultimate_ln.{i}"] = text_model.final_layer_norm(out.hidden_states[-2])
    return io


def save_io(d, io):
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(d, "io.safetensors"))


def text_model(cfg_kw, seed, impl="eager"):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(**cfg_kw)
    cfg._attn_implementation = impl
    m = CLIPTextModel(cfg).eval()
    assert m.config._attn_implementation == impl, m.config._attn_implementation
    perturb(m, torch.Generator().manual_seed(seed + 1))
    return m


def fresh_dir(out, name):
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def write_bin_4x(model, d):
    """A transformers-4.x `pytorch_model.bin`: every key under `text_model.`, plus the persistent position_ids buffer
    (int64 `arange(max_pos).expand(1, -1)`, a stride-0 view, as the SD-2.1 file holds it)."""
    sd = {"text_model." + k: v.clone() for k, v in model.state_dict().items()}
    n = model.config.max_position_embeddings
    sd["text_model.embeddings.position_ids"] = torch.arange(n).expand((1, -1))
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    model.config.to_json_file(os.path.join(d, "config.json"))


def saved_keys(d):
    return sorted(load_file(os.path.join(d, "model.safetensors")).keys())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    manifest = []

    def add(name, d, io, **kw):
        save_io(d, io)
        weights = [f for f in sorted(os.listdir(d)) if f not in ("io.safetensors", "config.json")]
        assert weights, d
        entry = {"case": name, "dir": name, "weights": weights, "batches": sum(k.startswith("ids.") for k in io)}
        entry.update(kw)
        manifest.append(entry)
        print(f"{name}: {weights}", file=sys.stderr)

    # Small random configs, one per activation. gelu also records the sdpa output and a 4.x pytorch_model.bin;
    # quick_gelu also a fp16 safetensors.
    for i, act in enumerate(["gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh"]):
        kw = dict(SMALL, hidden_act=act)
        m = text_model(kw, SEED + 10 * i)
        batches = input_batches(kw["vocab_size"], kw["max_position_embeddings"], torch.Generator().manual_seed(i))
        io = reference(m, batches)
        name = f"small_{act}"
        d = fresh_dir(args.out, name)
        m.save_pretrained(d)
        keys = saved_keys(d)
        assert not any(k.startswith("text_model.") for k in keys), "transformers 5.x saves without text_model."
        extra = {}
        if act == "gelu":
            sdpa = CLIPTextModel.from_pretrained(d, attn_implementation="sdpa").eval()
            assert sdpa.config._attn_implementation == "sdpa"
            worst = 0.0
            with torch.no_grad():
                for j, ids in enumerate(batches):
                    o = sdpa(input_ids=ids).last_hidden_state
                    io[f"last_hidden_state_sdpa.{j}"] = o
                    worst = max(worst, (o - io[f"last_hidden_state.{j}"]).abs().max().item())
            print(f"{name}: HF sdpa vs eager max abs diff {worst:.3e}", file=sys.stderr)
            assert worst <= 1e-5, worst
            extra["sdpa_vs_eager"] = worst
        add(name, d, io, hidden_act=act, layout="transformers-5", dtype="float32", **extra)

        if act == "gelu":
            # Sharded: model.safetensors.index.json and its shards (what save_pretrained writes for big models).
            sname = f"{name}_sharded"
            sd_ = fresh_dir(args.out, sname)
            m.save_pretrained(sd_, max_shard_size="300KB")
            assert os.path.exists(os.path.join(sd_, "model.safetensors.index.json")), os.listdir(sd_)
            add(sname, sd_, io, hidden_act=act, layout="transformers-5", dtype="float32")
            bname = f"{name}_bin4x"
            bd = fresh_dir(args.out, bname)
            write_bin_4x(m, bd)
            add(bname, bd, io, hidden_act=act, layout="transformers-4", dtype="float32")
        if act == "quick_gelu":
            # fp16 weights; the reference is the fp32 model holding the fp16-rounded weights (what loading a fp16
            # file into a fp32 model computes).
            m16 = text_model(kw, SEED + 10 * i).half()
            hname = f"{name}_fp16"
            hd = fresh_dir(args.out, hname)
            m16.save_pretrained(hd)
            assert all(v.dtype == torch.float16 for v in load_file(os.path.join(hd, "model.safetensors")).values())
            io16 = reference(m16.float(), batches)
            add(hname, hd, io16, hidden_act=act, layout="transformers-5", dtype="float16")

    # A full CLIPModel folder (vision tower, projections, logit_scale): only the text tower is used.
    torch.manual_seed(SEED + 100)
    ccfg = CLIPConfig(text_config=dict(SMALL, hidden_act="quick_gelu"), vision_config=TINY_VISION)
    ccfg._attn_implementation = "eager"
    clip = CLIPModel(ccfg).eval()
    assert clip.text_model.config._attn_implementation == "eager", clip.text_model.config._attn_implementation
    perturb(clip, torch.Generator().manual_seed(SEED + 101))
    batches = input_batches(SMALL["vocab_size"], SMALL["max_position_embeddings"], torch.Generator().manual_seed(9))
    io = reference(clip.text_model, batches)
    d = fresh_dir(args.out, "full_clip_model")
    clip.save_pretrained(d)
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= set(saved_keys(d))
    add("full_clip_model", d, io, hidden_act="quick_gelu", layout="clip-model", dtype="float32")

    # Stable Diffusion 2.1's text encoder sizes with random weights: one fp32 copy on disk (~1.4 GB).
    m = text_model(SD21, SEED + 1000)
    batches = input_batches(SD21["vocab_size"], SD21["max_position_embeddings"], torch.Generator().manual_seed(21))
    io = reference(m, batches)
    d = fresh_dir(args.out, "sd21_text_encoder")
    m.save_pretrained(d)
    del m
    add("sd21_text_encoder", d, io, hidden_act="gelu", layout="transformers-5", dtype="float32", sd21=True)

    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "cases": manifest}, f,
                  indent=1)
    print(f"{len(manifest)} CLIP cases in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
