"""CLIP tokenizer fixtures: transformers.CLIPTokenizer, built from the canonical CLIP BPE vocabulary, on a fixed set
of varied prompts, for both padding conventions (SD-2.x pads with "!", SD-1.x with "<|endoftext|>").

Writes, under --out:
  sd2/, sd1/          Hugging Face tokenizer folders (vocab.json, merges.txt, special_tokens_map.json,
                      tokenizer_config.json), as the Stable Diffusion repositories ship them
  sd2-json/, sd1-json/ the same tokenizers saved as tokenizer.json (+ tokenizer_config.json)
  ids.json            {"prompts": [...], "sd2": [[77 ids], ...], "sd1": [...]}
The Rust test `tokenizer` loads each source (and the .gz vocabulary itself) and compares.
"""
import argparse
import gzip
import json
import os
import random

import transformers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

HANDWRITTEN = [
    "T1-weighted image of a brain.",
    "",
    " ",
    "   leading and trailing spaces   ",
    "FLAIR to T1w: axial slice #42 of subject sub-0001",
    "A photo of a cat",
    "a PHOTO of A Cat",
    "it's a dog's life, isn't it? we'll see; they'd know. I'm sure you've heard.",
    "IT'S SHOUTING'S CONTRACTIONS'LL",
    "hello!! wow! surprise!!!",
    "!",
    "!!!!!!!!",
    "what?! no... yes?",
    "tabs\tand\nnewlines\r\nand\u00a0no-break spaces",
    "numbers 0 12 345 6789 3.14159 1,000,000 -7 +8 1e-5 2^10",
    "x² ⅓ ½ ③ 一二三",
    "Café naïve façade résumé ÅNGSTRÖM Zürich",
    "e\u0301 (decomposed accent) vs é",
    "東京は日本の首都です",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "שלום עולם",
    "γειά σου κόσμε",
    "😀 emoji 🧠🩻 brain scan 👩‍⚕️",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "a<|endoftext|>b",
    "email me at someone@example.com or visit https://example.org/path?q=1&r=2",
    "snake_case and kebab-case and CamelCase and dot.separated.words",
    "\"double quotes\" and 'single quotes' and `backticks` and «guillemets» and “curly”",
    "brackets (round) [square] {curly} <angle>",
    "math: a+b=c, x*y/z, 5% of 20 = 1; a<b>c",
    "slashes / back\\slashes | pipes ~ tildes ^ carets",
    "ALL CAPS PROMPT FOR A T2-WEIGHTED MRI",
    "mixed123letters456and789digits",
    "hyphen-ated-words-in-a-row",
    "ellipsis… em—dash – en-dash",
    "ﬁ ligature ﬂ and ＦＵＬＬＷＩＤＴＨ letters",
    "zero\u200bwidth\u200bspace",
    "control\u0007char",
    "a" * 200,
    "word " * 100,
    "a very long prompt " + "with many different words describing a brain MRI slice " * 10,
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38",
]

WORDS = ("brain mri slice axial coronal sagittal flair t1w t2 weighted image of a the and lesion white matter grey "
         "gray ventricle cortex skull tumour tumor healthy patient subject contrast high resolution noise 3T 1.5T "
         "scan synthetic realistic sharp blurry").split()
PUNCT = [".", ",", "!", "?", ";", ":", "-", "'s", "'", "\"", "(", ")", "/", "&", "#", "%", "..."]
EXTRA = ["é", "ß", "ø", "ñ", "ü", "ç", "日本", "한국어", "中文", "🙂", "№", "°C", "µm", "±", "×", "½"]


def generated(n, seed):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        k = rnd.randint(1, 40)
        parts = []
        for _ in range(k):
            r = rnd.random()
            if r < 0.7:
                w = rnd.choice(WORDS)
                w = w.upper() if rnd.random() < 0.1 else (w.capitalize() if rnd.random() < 0.2 else w)
                parts.append(w)
            elif r < 0.85:
                parts.append(rnd.choice(PUNCT))
            elif r < 0.93:
                parts.append(str(rnd.randint(0, 10 ** rnd.randint(1, 6))))
            else:
                parts.append(rnd.choice(EXTRA))
        sep = lambda: rnd.choice([" ", " ", " ", "", "  ", "\t"])
        out.append("".join(p + sep() for p in parts).rstrip(" ") if rnd.random() < 0.5 else " ".join(parts))
    return out


def bytes_to_unicode():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_folder(d, vocab_path, pad):
    """A Stable-Diffusion-style tokenizer folder built from OpenAI's BPE vocabulary."""
    lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(dict(specials, model_max_length=77, tokenizer_class="CLIPTokenizer"), f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", required=True, help="bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    prompts = HANDWRITTEN + generated(200, seed=5)
    result = {"prompts": prompts, "transformers": transformers.__version__}
    for name, pad in (("sd2", "!"), ("sd1", EOS)):
        d = os.path.join(args.out, name)
        write_folder(d, args.vocab, pad)
        tok = CLIPTokenizer.from_pretrained(d)
        assert tok.pad_token == pad and tok.model_max_length == 77
        result[name] = [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in prompts]
        jd = os.path.join(args.out, f"{name}-json")
        os.makedirs(jd, exist_ok=True)
        tok.backend_tokenizer.save(os.path.join(jd, "tokenizer.json"))
        with open(os.path.join(jd, "tokenizer_config.json"), "w") as f:
            json.dump({"pad_token": pad, "model_max_length": 77}, f)
    with open(os.path.join(args.out, "ids.json"), "w") as f:
        json.dump(result, f, ensure_ascii=False)
    print(f"wrote {len(prompts)} prompts x 2 paddings to {args.out}")


if __name__ == "__main__":
    main()
