"""Tiny feature drafts for a tiny target, built on the fly: random weights around the
initialisation (each draft its own seed), the target's whole vocabulary or a reduced one."""

from __future__ import annotations

from pathlib import Path

import torch

from server.engine.draft_vocab import DraftVocab
from server.engine.feature_draft import FeatureSpec, init_weights, save_feature_draft
from server.engine.models import load_causal_lm, model_config


def build_feature_drafts(target_dir: str, root: Path, m: int = 3, reduced: int = 0) -> list[str]:
    """M feature draft folders under `root` (reused when present); `reduced` > 0: S = the first
    `reduced` ids of the target's vocabulary."""
    root = Path(root)
    folders = [root / f"feature{m_}" for m_ in range(m)]
    if all((f / "model.safetensors").is_file() for f in folders):
        return [str(f) for f in folders]
    cfg = model_config(target_dir)
    target = load_causal_lm(target_dir)
    spec = FeatureSpec.of_target(cfg)
    for i, folder in enumerate(folders):
        w = init_weights(spec, target, 1, seed=10 + i)
        g = torch.Generator().manual_seed(20 + i)
        w = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in w.items()}  # distinct drafts
        save_feature_draft(folder, spec, {k: v[0] for k, v in w.items()}, torch.float32)
        if reduced:
            DraftVocab(torch.arange(reduced), int(cfg["vocab_size"]), 0).save(folder)
    return [str(f) for f in folders]
