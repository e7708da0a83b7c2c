"""Stochastic instances of the target by low-rank weight noise, and their mutual information over
a token tree (`tree.py`): the ground truths, the upper bound and the TokUR baseline of
`epispec eval --bundle B`.

An instance, drawn by its seed, adds to every chosen linear weight W [out, in]

    ΔW = σ · rms(W) · A Bᵀ / √r,     A [out, r], B [in, r] standard normal

applied as a forward hook, y = x Wᵀ + σ·rms(W)/√r · (x B) Aᵀ — the weights are never copied, and
the draws are those of `drafts.osd.TeacherSampler` ("lowrank") for the same seed and linears (a
test checks the two agree). A family says where the noise goes:

    layers   the last `layers` decoder layers (0: every layer); when the noise is in the last
             K < L layers only, layers 0..L−K−1 are the same in every instance and run once (the
             target's own pass gives their output, `prefix`)
    modules  which linears of a noisy layer (None: every one; ("q_proj", "k_proj", "v_proj",
             "o_proj"): the attention projections, TokUR's placement)

The mutual information of S instances at a position is H(p̄) − (1/S) Σ_s H(p_s), p̄ = mean_s p_s
(nats), accumulated instance by instance ([T, V] of memory, not [T, S, V]).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from drafts.osd import layer_range
from measure.evaluation.tree import Tree, head_logprobs, run_body
from server.engine.uncertainty import entropy

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class NoiseFamily:
    name: str
    noise: float  # σ, relative to each weight's rms
    rank: int
    layers: int  # the last `layers` decoder layers are noisy (0: all)
    modules: tuple[str, ...] | None  # linear names inside a noisy layer (None: every linear)
    seed_start: int
    samples: int  # S instances, seeds [seed_start, seed_start + S)

    @property
    def seeds(self) -> range:
        return range(self.seed_start, self.seed_start + self.samples)

    def describe(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules) if self.modules else "every linear"
        d["seeds"] = [self.seed_start, self.seed_start + self.samples]
        return d


class LowRankNoise:
    """The instances of one `NoiseFamily` on `target` (a transformers Llama-style causal LM)."""

    def __init__(self, target, family: NoiseFamily):
        if family.samples < 1 or family.rank < 1 or not family.noise > 0:
            raise ValueError(f"noise family {family.name}: samples, rank >= 1 and noise > 0 needed")
        n = len(target.model.layers)
        if not 0 <= family.layers <= n:
            raise ValueError(f"noise family {family.name}: layers must be in [0, {n}]")
        self.target, self.family = target.eval(), family
        self.first_noisy = n - (family.layers or n)
        noisy = tuple(f"model.layers.{i}." for i in range(self.first_noisy, n))
        self.linears = [
            (name, mod)
            for name, mod in target.named_modules()
            if isinstance(mod, torch.nn.Linear)
            and name.startswith(noisy)
            and (family.modules is None or name.rsplit(".", 1)[-1] in family.modules)
        ]
        if not self.linears:
            raise ValueError(f"noise family {family.name}: no linear matches {family.modules}")
        self._rms = {name: float(m.weight.detach().float().pow(2).mean().sqrt()) for name, m in self.linears}

    @property
    def prefix_layers(self) -> int:
        """Leading layers shared by every instance (0 when the first layer is noisy)."""
        return self.first_noisy

    @contextmanager
    def instance(self, seed: int):
        """The target as the instance of `seed`, inside the block."""
        g = torch.Generator().manual_seed(seed)
        hooks = []
        try:
            for name, mod in self.linears:
                out_f, in_f = mod.weight.shape
                a = torch.randn(out_f, self.family.rank, generator=g)  # [out, r]
                b = torch.randn(in_f, self.family.rank, generator=g)  # [in, r]
                a = a * (self.family.noise * self._rms[name] / self.family.rank**0.5)
                hooks.append(mod.register_forward_hook(_low_rank_hook(a.to(mod.weight), b.to(mod.weight))))
            yield self.target
        finally:
            for h in hooks:
                h.remove()

    @torch.inference_mode()
    def logprobs(
        self, seed: int, tree: Tree, at: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The instance's log-probs at the tree rows `at` [T] -> [T, V]. With `prefix` (the hidden
        states entering the first noisy layer, [N, E], from the target's own pass) only the noisy
        layers run."""
        with self.instance(seed) as model:
            if prefix is None:
                h, _ = run_body(model, tree)  # [N, E]
            else:
                if not self.prefix_layers:
                    raise ValueError(f"{self.family.name}: a prefix needs noise in the last layers only")
                n = len(model.model.layers)
                with layer_range(model, self.prefix_layers, n, final_norm=True):
                    h = model.model(
                        inputs_embeds=prefix[None],
                        position_ids=tree.positions()[None],
                        attention_mask=tree.mask(prefix.dtype),
                        use_cache=False,
                    ).last_hidden_state[0]  # [N, E]
            return head_logprobs(model, h[at])

    def mutual_information(
        self, tree: Tree, at: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MI of the family's S instances at the tree rows `at`. [T] -> [T] (nats, ≥ 0)"""
        p_sum = h_sum = None
        for seed in self.family.seeds:
            lp = self.logprobs(seed, tree, at, prefix)  # [T, V]
            p, h = lp.double().exp(), entropy(lp).double()
            p_sum = p if p_sum is None else p_sum + p
            h_sum = h if h_sum is None else h_sum + h
        p_bar = p_sum / self.family.samples  # [T, V]
        h_bar = -(p_bar * torch.log(p_bar.clamp_min(1e-300))).sum(-1)  # [T]
        return (h_bar - h_sum / self.family.samples).clamp_min(0.0)

    def cost(self) -> dict:
        """Extra target passes per scored token, in parameters touched: S · (noisy layers + head) /
        (all layers + head). The shared first layers are the target's own pass, not extra."""
        layers = self.target.model.layers
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        head = self.target.get_output_embeddings().weight.numel()
        each = sum(per_layer[self.first_noisy :]) + head
        return {
            "target_passes_per_token": self.family.samples * each / (sum(per_layer) + head),
            "rule": "S · (noisy layers + head) / (all layers + head), parameters touched per scored token; "
            "the layers before the first noisy one are the target's own pass",
        }

    def describe(self) -> dict:
        return {**self.family.describe(), "linears": len(self.linears), **self.cost()}


def _low_rank_hook(a: torch.Tensor, b: torch.Tensor):
    """Forward hook adding (x B) Aᵀ to a linear's output. a [out, r] (scaled), b [in, r]"""

    def hook(_mod, inp, out):
        return out + (inp[0] @ b) @ a.T

    return hook
