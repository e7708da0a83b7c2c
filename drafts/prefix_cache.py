"""The teacher's deterministic prefix, computed once per training window (OSD with noise in the
last K layers, `drafts.osd`).

With noise only in the last K of L layers, every stochastic instance shares layers 0..L-K-1, so
the hidden states entering layer L-K are computed once for each fixed training window and kept;
each step then draws a fresh instance and runs only its K noisy layers and the head on them. The
windows are packed once (documents shuffled with the run's seed, cut into seq_len+1 tokens);
epochs reshuffle the windows, not the packing. The cache is written to the draft's folder
(`teacher_prefix.pt`, float32 [N, seq_len, E]: 4·E bytes per token) so an interrupted run
resumes without recomputing it, and removed when the draft is finished.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from drafts.folder import TEACHER_PREFIX as FILE


@dataclass(frozen=True)
class CachedBatch:
    """One training batch with the teacher's prefix. ids [B, S+1], prefix [B, S, E]"""

    ids: torch.Tensor
    prefix: torch.Tensor

    def to(self, device) -> CachedBatch:
        return CachedBatch(self.ids.to(device), self.prefix.to(device))


def pack_windows(docs: list[list[int]], seq_len: int, rng: random.Random) -> torch.Tensor:
    """The documents, shuffled, as one stream cut into windows (the remainder dropped). [N, seq_len+1]"""
    order = list(range(len(docs)))
    rng.shuffle(order)
    stream = [t for i in order for t in docs[i]]
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"the data holds {len(stream)} tokens: not one window of {seq_len + 1}.")
    return torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)


def teacher_prefix(
    teacher, windows: torch.Tensor, folder: Path, *, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """teacher.prefix of every window's inputs, from `folder` when already computed. [N, S+1] -> [N, S, E]"""
    from tqdm import tqdm

    key = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16] + f":{teacher.prefix_layers}"
    path = Path(folder) / FILE
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return saved["prefix"]
    dev = next(teacher.target.parameters()).device
    parts = []
    for i in tqdm(
        range(0, len(windows), batch_size),
        desc=f"teacher prefix ({teacher.prefix_layers} layers)",
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
    ):
        x = windows[i : i + batch_size, :-1].to(dev)  # [b, S]
        parts.append(teacher.prefix(x).float().cpu())  # [b, S, E]
    prefix = torch.cat(parts)  # [N, S, E]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "prefix": prefix}, path)
    return prefix


def shuffled_indices(n: int, batch_size: int, rng: random.Random):
    """Endless batches of indices into n windows, reshuffled every epoch (the remainder of an
    epoch dropped). Raises ValueError where n cannot fill one batch."""
    if n < batch_size:
        raise ValueError(f"{n} windows cannot fill one batch of {batch_size}; lower --batch-size.")
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch_size + 1, batch_size):
            yield torch.tensor(order[i : i + batch_size])


def cached_batches(windows: torch.Tensor, prefix: torch.Tensor, batch_size: int, rng: random.Random):
    """Endless batches of windows with their prefixes, reshuffled every epoch."""
    for idx in shuffled_indices(len(windows), batch_size, rng):
        yield CachedBatch(windows[idx], prefix[idx])


def drop(folder: Path) -> None:
    (Path(folder) / FILE).unlink(missing_ok=True)
