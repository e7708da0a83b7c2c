"""A proposer whose rows propose by a fixed rule instead of the adaptive policy's, so that tests
see rows with and without a proposal side by side in every batch: vLLM loads it by name in its
worker (`VllmEngine`'s PROPOSER_CLASS, patched by test_vllm_speculation.py)."""

from __future__ import annotations

import zlib

from server.engine.vllm_proposer import EnsembleProposer


def proposes(req_id: str, history_len: int) -> bool:
    """A request proposes on every other step, half the requests on odd history lengths."""
    return (zlib.crc32(req_id.encode()) + history_len) % 2 == 0


class AlternatingProposer(EnsembleProposer):
    """EnsembleProposer, except that each row proposes all its drafted tokens or none, by
    `proposes` (a rule of the request alone, so its tokens do not depend on the batch)."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        real = self.ensemble.propose

        def choose(rows, confs):
            return [
                len(c) if proposes(r.req_id, len(r.history)) else 0 for r, c in zip(rows, confs, strict=True)
            ]

        self.ensemble.propose = lambda rows, *_: real(rows, choose)
