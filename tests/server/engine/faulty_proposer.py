"""A proposer whose draft ensemble fails on one token: vLLM loads it by name in its engine-core
process (`VllmEngine`'s PROPOSER_CLASS, patched by test_vllm_proposer_faults.py), where a test
cannot reach in to inject a fault."""

from __future__ import annotations

from server.engine.vllm_proposer import EnsembleProposer

POISON = 397  # a token id of the tiny vocabulary (400); a row whose history holds it fails


class FaultyProposer(EnsembleProposer):
    """EnsembleProposer, except that a step whose batch holds a POISON row raises inside the
    ensemble (as a draft's forward pass would) on every step."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        real = self.ensemble.propose

        def propose(rows, *args):
            if any(bool((r.history == POISON).any()) for r in rows):
                raise RuntimeError("injected proposer fault")
            return real(rows, *args)

        self.ensemble.propose = propose
