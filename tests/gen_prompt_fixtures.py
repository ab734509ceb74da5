"""`medgen encode-prompt` fixtures: a small random CLIPTextModel with the full CLIP vocabulary, a Stable-Diffusion-2-
style tokenizer folder, and what transformers makes of the reference prompts (the conditional prompt, "" and the
training null sequence [BOS] + [EOS] * 76).

Writes, under --out: text_encoder/ (save_pretrained), tokenizer/ (vocab.json, merges.txt, ...), expected.safetensors.
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gen_tokenizer_fixtures import BOS, EOS, write_folder

PROMPTS = ["T1-weighted image of a brain.", "FLAIR to T1w, slice 42!"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", required=True, help="bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(11)
    tok_dir = os.path.join(args.out, "tokenizer")
    write_folder(tok_dir, args.vocab, "!")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                         attn_implementation="eager")
    model = CLIPTextModel(cfg).eval()
    model.save_pretrained(os.path.join(args.out, "text_encoder"))

    def ids(texts):
        return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    null = torch.tensor([[tok.convert_tokens_to_ids(BOS)] + [tok.convert_tokens_to_ids(EOS)] * 76])
    out = {"input_ids": ids(PROMPTS), "uncond_input_ids": ids([""]), "null_input_ids": null}
    with torch.no_grad():
        out["context"] = model(out["input_ids"]).last_hidden_state
        out["uncond_context"] = model(out["uncond_input_ids"]).last_hidden_state
        out["null_context"] = model(null).last_hidden_state
        hs = model(out["input_ids"], output_hidden_states=True).hidden_states
        out["context_clip_skip_1"] = model.final_layer_norm(hs[-2])
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(args.out, "expected.safetensors"),
              metadata={"prompts": "\n".join(PROMPTS)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
