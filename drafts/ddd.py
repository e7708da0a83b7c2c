"""Data-Diverse Drafts (DDD): each of the M drafts gets a disjoint partition of the data.

Partitions are a function of the documents' contents, not their order: documents are identified
by `text_hash`, duplicates are merged (a text lives in exactly one partition), the unique hashes
are sorted and dealt round-robin, so partitions differ in size by at most one and anyone can
recompute and check membership from the recorded hashes. Without DDD (the ablation) every draft
gets the whole corpus.
"""

from __future__ import annotations

import hashlib

from drafts.corpus import text_hash

RULE = "unique sha256(text)[:16] sorted, dealt round-robin: partition = rank % M"


def partition(texts: list[str], m: int, enabled: bool = True) -> list[list[int]]:
    """Indices into `texts` for each of the m drafts. Disjoint and covering when enabled."""
    if m < 1:
        raise ValueError(f"The number of drafts M must be at least 1 (got {m}).")
    if not texts:
        raise ValueError("Cannot partition an empty corpus.")
    if not enabled:
        return [list(range(len(texts))) for _ in range(m)]
    hashes = [text_hash(t) for t in texts]
    unique = sorted(set(hashes))
    if len(unique) < m:
        raise ValueError(
            f"The corpus has {len(unique)} distinct documents, too few for {m} disjoint DDD partitions."
        )
    slot = {h: r % m for r, h in enumerate(unique)}
    parts: list[list[int]] = [[] for _ in range(m)]
    for i, h in enumerate(hashes):
        parts[slot[h]].append(i)
    return parts


def describe(texts: list[str], indices: list[int], index: int, m: int, enabled: bool) -> dict:
    """A draft's partition record: its hashes and a digest of them."""
    hashes = sorted({text_hash(texts[i]) for i in indices})
    return {
        "enabled": enabled,
        "partition": index if enabled else None,
        "of": m,
        "rule": RULE if enabled else "no DDD: every draft sees all documents",
        "documents": len(indices),
        "digest": hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16],
        "hashes": hashes,
    }
