"""GGUF -> Hugging Face model folder, through transformers' own GGUF loader.

`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` reads the file's config, dequantizes
every tensor (Q4_1, Q8_0, ... -> float32; it needs the `gguf` package) and undoes llama.cpp's
q/k row permutation; `AutoTokenizer.from_pretrained(dir, gguf_file=name)` rebuilds the tokenizer,
its special tokens and the chat template from the file's metadata. The loaded model carries a
`quantization_config` that `save_pretrained` refuses, so the weights go into a plain model built
from the same config without it, which is cast once to the requested dtype and saved as
safetensors beside the tokenizer and the generation config.
"""

from __future__ import annotations

from pathlib import Path

from server.hub.source import SourceError

DTYPES = ("bfloat16", "float16", "float32")
# llama.cpp pre-tokenizers (`tokenizer.ggml.pre`) that transformers' GGUF loader does not know and
# replaces by GPT-2's split: the regex llama.cpp applies before GPT-2's (llama-vocab.cpp).
# "smollm": every digit on its own (LLAMA_VOCAB_PRE_TYPE_SMOLLM), as SmolLM's own tokenizer does;
# without it "a  1" gives 'a','Ġ','Ġ','1' instead of 'a','ĠĠ','1'.
EXTRA_PRE_SPLITS = {"smollm": r"\p{N}"}


def convert_gguf(gguf_path: str | Path, out: str | Path, dtype: str = "bfloat16") -> dict:
    """Write the model in `gguf_path` as a Hugging Face folder `out` (created; must not exist).

    Returns {"architecture", "parameters", "vocab_size", "dtype"}. Raises SourceError when
    transformers cannot read the file (not a GGUF, an unsupported architecture, missing `gguf`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise SourceError(f"Unknown dtype '{dtype}': choose one of {list(DTYPES)}.")
    gguf_path, out = Path(gguf_path), Path(out)
    kwargs = {}
    try:  # transformers >= 5 keeps GGUF blocks packed unless asked to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types for an unreadable file
        raise SourceError(
            f"transformers cannot load '{gguf_path.name}' as a GGUF model ({type(exc).__name__}: {exc})."
        ) from exc

    _fix_pre_tokenizer(tokenizer, gguf_path)
    plain = _plain_copy(loaded).to(getattr(torch, dtype))
    out.mkdir(parents=True)
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    for f in out.iterdir():  # save_pretrained may leave 0600 files; the cache is shared read-only
        f.chmod(0o644)
    return {
        "architecture": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "vocab_size": plain.config.vocab_size,
        "dtype": dtype,
    }


def _plain_copy(loaded):
    """The same weights in a model built from the config without its quantization_config."""
    from transformers import AutoModelForCausalLM

    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # general.name of the file
        cfg.pop(key, None)
    config = type(loaded.config).from_dict(cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    # strict: every tensor of the file lands in the plain model and nothing is left at init
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    return plain.eval()


def gguf_field(gguf_path: str | Path, key: str):
    """One metadata value of a GGUF file (None when absent), read with the `gguf` package."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get(key)
    return None if field is None else field.contents()


def _fix_pre_tokenizer(tokenizer, gguf_path: Path) -> None:
    """Apply the file's llama.cpp pre-tokenizer where transformers fell back to GPT-2's alone."""
    from tokenizers import Regex, pre_tokenizers

    split = EXTRA_PRE_SPLITS.get(gguf_field(gguf_path, "tokenizer.ggml.pre"))
    current = tokenizer.backend_tokenizer.pre_tokenizer
    if split is None or not isinstance(current, pre_tokenizers.ByteLevel):
        return  # nothing to add, or transformers already built a split of its own
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
