"""Online Stochastic Distillation (OSD): at every step the teacher is a freshly drawn stochastic
instance of the target, so that in expectation the draft learns the target's aggregate.

Modes (recorded in the draft's training record):
    lowrank   W + σ·rms(W)·A Bᵀ/√r on every linear weight of the decoder layers (or only of the
              last `layers` of them), A [out, r], B [in, r] standard normal, drawn per step
              (σ = `noise`)
    dropout   dropout with probability `noise` on every attention and MLP output (MC dropout)
    ensemble  one member of a target ensemble, drawn uniformly per step
    none      the fixed target (the no-OSD ablation)

An instance is determined by its step seed, so resumed runs redraw the same instances; the sampler
counts the distinct instances it drew (`instances`) and, for ensembles, the draws per member.

Noise in the last K layers only (`layers=K`) leaves the first L-K layers deterministic: their
output (the hidden states entering layer L-K, `prefix`) is the same for every instance, so it can
be computed once per training window and reused at every step and epoch (`drafts.prefix_cache`);
a step then costs K layers and the head instead of the whole target — on a 2-core CPU the
difference between a few hundred and a few thousand teacher tokens per second for SmolLM2-135M
(30 layers, K = 2).
"""

from __future__ import annotations

import random
from collections import Counter
from contextlib import contextmanager

import torch

MODES = ("lowrank", "dropout", "ensemble", "none")


class TeacherSampler:
    def __init__(
        self,
        target,
        mode: str = "lowrank",
        *,
        noise: float = 0.1,
        rank: int = 4,
        members: list | None = None,
        layers: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"OSD mode must be one of {', '.join(MODES)}, not '{mode}'.")
        if mode == "ensemble" and not members:
            raise ValueError("OSD mode 'ensemble' needs at least one ensemble member (--ensemble DIR ...).")
        if mode in ("lowrank", "dropout") and not noise > 0:
            raise ValueError(f"OSD mode '{mode}' needs --noise > 0 (got {noise}).")
        n_layers = len(target.model.layers)
        if not 0 <= layers <= n_layers:
            raise ValueError(f"OSD --noise-layers must be within [0, {n_layers}] (0: all), not {layers}.")
        if layers and mode != "lowrank":
            raise ValueError("OSD --noise-layers applies to mode 'lowrank' only.")
        self.target, self.mode, self.noise, self.rank = target.eval(), mode, noise, rank
        self.layers = layers or n_layers  # noisy layers: the last `self.layers`
        self.members = [m.eval() for m in members or []]
        self.draws: Counter = Counter()  # instance id -> times drawn
        noisy = {f"model.layers.{i}." for i in range(n_layers - self.layers, n_layers)}
        self._linears = [
            (name, mod)
            for name, mod in target.named_modules()
            if isinstance(mod, torch.nn.Linear) and any(name.startswith(n) for n in noisy)
        ]
        self._base = (
            {name: mod.weight.detach().clone() for name, mod in self._linears} if mode == "lowrank" else {}
        )

    @property
    def instances(self) -> int:
        """Distinct teacher instances drawn so far."""
        return len(self.draws)

    def describe(self) -> dict:
        out = {"mode": self.mode, "instances": self.instances, "draws": sum(self.draws.values())}
        if self.mode in ("lowrank", "dropout"):
            out["noise"] = self.noise
        if self.mode == "lowrank":
            out["rank"] = self.rank
            out["layers"] = self.layers
        if self.mode == "ensemble":
            out["members"] = len(self.members)
            out["draws_per_member"] = {str(k): v for k, v in sorted(self.draws.items())}
        return out

    @property
    def prefix_layers(self) -> int:
        """Leading layers that are the same in every instance (0 unless noise is in the last ones)."""
        return len(self.target.model.layers) - self.layers if self.mode == "lowrank" else 0

    @torch.no_grad()
    def prefix(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first noisy layer (no noise drawn). [B, S] -> [B, S, E]"""
        with layer_range(self.target, 0, self.prefix_layers, final_norm=False):
            return self.target.model(input_ids=input_ids, use_cache=False).last_hidden_state

    @torch.no_grad()
    def logprobs(
        self,
        step_seed: int,
        input_ids: torch.Tensor,
        columns: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        positions: slice | None = None,
    ) -> torch.Tensor:
        """Log-probs of the instance drawn for `step_seed`. [B, S] -> [B, S, V]

        With `columns` (target ids [V_d]): the instance's distribution renormalized over those
        ids, [B, S, V_d] (a reduced draft vocabulary, `drafts.reduced`). With `prefix`
        ([B, S, E], `self.prefix(input_ids)` computed earlier): only the noisy layers run. With
        `positions` (a slice of S): only those positions' log-probs, [B, S', ·] (the output head,
        the costliest layer of a small-vocabulary-heavy model, runs on those positions only)."""
        if prefix is not None and self.prefix_layers == 0:
            raise ValueError("a cached prefix needs noise in the last layers only (layers < all).")
        if self.mode == "none":
            self.draws[0] += 1
            return self._forward(self.target, input_ids, columns, positions=positions)
        if self.mode == "ensemble":
            k = random.Random(step_seed).randrange(len(self.members))
            self.draws[k] += 1
            return self._forward(self.members[k], input_ids, columns, positions=positions)
        self.draws[step_seed] += 1
        if self.mode == "lowrank":
            self._perturb(step_seed)
            try:
                if prefix is None:
                    return self._forward(self.target, input_ids, columns, positions=positions)
                n = len(self.target.model.layers)
                with layer_range(self.target, self.prefix_layers, n, final_norm=True):
                    return self._forward(
                        self.target, None, columns, inputs_embeds=prefix, positions=positions
                    )
            finally:
                self._restore()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed)
            hooks = self._dropout_hooks()
            try:
                return self._forward(self.target, input_ids, columns, positions=positions)
            finally:
                for h in hooks:
                    h.remove()

    @staticmethod
    def _forward(model, input_ids, columns=None, inputs_embeds=None, positions=None):
        kw = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "use_cache": False}
        if columns is None and positions is None:
            return torch.log_softmax(model(**kw).logits.float(), dim=-1)  # [B, S, V]
        # only the output rows of S (the head costs V_d/V of the full one), at `positions`
        h = model.model(**kw).last_hidden_state[:, positions or slice(None)]  # [B, S', E]
        head = model.get_output_embeddings().weight  # [V, E]
        head = head if columns is None else head[columns.to(h.device)]  # [V_d, E]
        return torch.log_softmax((h @ head.T).float(), dim=-1)  # [B, S, V_d]

    def _perturb(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for name, mod in self._linears:
            w = self._base[name]  # [out, in]
            a = torch.randn(w.shape[0], self.rank, generator=g)  # [out, r]
            b = torch.randn(w.shape[1], self.rank, generator=g)  # [in, r]
            scale = self.noise * w.float().pow(2).mean().sqrt() / self.rank**0.5
            mod.weight.copy_(w + (scale * a @ b.T).to(w.device, w.dtype))

    def _restore(self) -> None:
        for name, mod in self._linears:
            mod.weight.copy_(self._base[name])

    def _dropout_hooks(self) -> list:
        p = self.noise

        def hook(_mod, _inp, out):
            if isinstance(out, tuple):
                return (torch.nn.functional.dropout(out[0], p, True), *out[1:])
            return torch.nn.functional.dropout(out, p, True)

        layers = self.target.model.layers
        return [m.register_forward_hook(hook) for layer in layers for m in (layer.self_attn, layer.mlp)]


@contextmanager
def layer_range(model, start: int, stop: int, *, final_norm: bool):
    """Run `model.model` over decoder layers [start, stop) only (and without its final norm when
    `final_norm` is False): fed `inputs_embeds` = the hidden states entering layer `start`, the
    model's own causal mask and rotary positions apply unchanged."""
    inner = model.model
    layers, norm = inner.layers, inner.norm
    inner.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        inner.norm = torch.nn.Identity()
    try:
        yield
    finally:
        inner.layers, inner.norm = layers, norm
