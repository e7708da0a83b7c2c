"""Loading Hugging Face model folders and checking that drafts can serve a target.

Drafts must share the target's tokenizer and vocabulary (or a subset of it, `draft_vocab.py`):
their distributions are compared with the target's token by token. Both engines call `check_compatible` before loading
weights so that a mismatch is a clear start-up error, never a wrong number later.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from server.engine.draft_vocab import (
    FILE,
    DraftVocab,
    DraftVocabError,
    FullVocabularyDraft,
    read_draft_vocab,
    vocab_digest,
)
from server.engine.feature_draft import FeatureDraftError, is_feature_draft, load_feature_drafts, read_spec


class ModelFolderError(ValueError):
    """A model folder is missing, unreadable or incompatible with the target."""


def model_config(path: str | Path) -> dict:
    """The folder's config.json as a dict, with a clear error when it is not a model folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"Model folder '{folder}' does not exist.")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelFolderError(
            f"Model folder '{folder}' has no config.json: not a Hugging Face model folder."
        )
    return json.loads(cfg.read_text())


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a bad folder
        raise ModelFolderError(f"Cannot load a tokenizer from '{path}': {exc}") from exc


def check_compatible(target: str | Path, drafts: list[str | Path]) -> None:
    """Raise ModelFolderError naming the first draft whose vocabulary differs from the target's."""
    t_cfg = model_config(target)
    t_vocab = load_tokenizer(target).get_vocab()
    for d in drafts:
        if is_feature_draft(d):  # reads the target's own embedding: its hidden size must match
            _check_feature(target, t_cfg, d, t_vocab)
            continue
        d_cfg = model_config(d)
        try:
            reduced = read_draft_vocab(d)
        except DraftVocabError as exc:
            raise ModelFolderError(f"Draft '{d}': {exc}") from exc
        if reduced is not None:
            _check_reduced(target, t_cfg, d, d_cfg, reduced, t_vocab)
            continue
        if d_cfg.get("vocab_size") != t_cfg.get("vocab_size"):
            raise ModelFolderError(
                f"Draft '{d}' has vocab_size {d_cfg.get('vocab_size')} but the target '{target}' has "
                f"{t_cfg.get('vocab_size')}: drafts must share the target's vocabulary."
            )
        if (Path(d) / "tokenizer.json").exists() or (Path(d) / "tokenizer_config.json").exists():
            d_vocab = load_tokenizer(d).get_vocab()
            if d_vocab != t_vocab:
                diff = len(set(d_vocab.items()) ^ set(t_vocab.items()))
                raise ModelFolderError(
                    f"Draft '{d}' has a different tokenizer from the target '{target}' "
                    f"({diff} vocabulary entries differ): drafts must share the target's tokenizer."
                )


def _check_feature(target, t_cfg: dict, d, t_vocab: dict) -> None:
    try:
        spec = read_spec(d)
        reduced = read_draft_vocab(d)
    except (FeatureDraftError, DraftVocabError) as exc:
        raise ModelFolderError(f"Draft '{d}': {exc}") from exc
    if spec.hidden != t_cfg.get("hidden_size"):
        raise ModelFolderError(
            f"Feature draft '{d}' reads hidden states of size {spec.hidden}; the target '{target}' "
            f"has {t_cfg.get('hidden_size')}: it was trained for another target."
        )
    if reduced is not None and (
        reduced.target_vocab_size != t_cfg.get("vocab_size")
        or reduced.tokenizer_digest not in (None, vocab_digest(t_vocab))
    ):
        raise ModelFolderError(
            f"Feature draft '{d}' has a vocabulary S of another tokenizer than the target '{target}'."
        )


def _check_reduced(target, t_cfg: dict, d, d_cfg: dict, reduced: DraftVocab, t_vocab: dict) -> None:
    if reduced.target_vocab_size != t_cfg.get("vocab_size"):
        raise ModelFolderError(
            f"Draft '{d}' maps its vocabulary into {reduced.target_vocab_size} target tokens but the "
            f"target '{target}' has vocab_size {t_cfg.get('vocab_size')}."
        )
    if d_cfg.get("vocab_size") != reduced.size:
        raise ModelFolderError(
            f"Draft '{d}' has vocab_size {d_cfg.get('vocab_size')} but its {FILE} lists {reduced.size} tokens."
        )
    digest = reduced.tokenizer_digest
    if digest is not None and digest != vocab_digest(t_vocab):
        raise ModelFolderError(
            f"Draft '{d}' was made for another tokenizer than the target '{target}''s "
            f"(tokenizer digest {digest}): drafts must share the target's tokenizer."
        )


def load_draft(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A draft as a model over the target's vocabulary: the plain causal LM, or, for a draft with
    a reduced vocabulary (`draft_vocab.json`), a `FullVocabularyDraft` around it."""
    lm = load_causal_lm(path, device, dtype)
    reduced = read_draft_vocab(path)
    return lm if reduced is None else FullVocabularyDraft(lm, reduced).eval()


def load_drafts(paths: list[str | Path], target: str | Path, device: str = "cpu", dtype=torch.float32):
    """A bundle's drafts for teacher forcing and the reference engine: stacked `FeatureDrafts`
    when they are feature drafts (they need the target's folder), else a list of causal LMs
    (`load_draft`). See `teacher_forced.forced_draft_logprobs`."""
    if paths and is_feature_draft(paths[0]):
        return load_feature_drafts(list(paths), target, device, dtype)
    return [load_draft(p, device, dtype) for p in paths]


def draft_kv_config(path: str | Path) -> dict:
    """What `draft_kv.kv_bytes_per_token` reads of a draft (its config.json; a feature draft's
    one layer from its spec)."""
    if is_feature_draft(path):
        s = read_spec(path)
        return {
            "num_hidden_layers": 1,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "head_dim": s.head_dim,
        }
    return model_config(path)


def eos_token_ids(path: str | Path, tokenizer) -> set[int]:
    """The ids that end generation: generation_config.json's, else config.json's, else the
    tokenizer's EOS (the order transformers uses). Both engines stop on exactly this set."""
    folder = Path(path)
    gen = folder / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = model_config(folder).get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return {int(i) for i in ids if i is not None}


def max_model_len(path: str | Path) -> int:
    cfg = model_config(path)
    return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model_config(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def count_parameters(path: str | Path) -> int:
    """Parameters of a saved model without loading its weights (safetensors header only)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                total += _prod(st.get_slice(name).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
