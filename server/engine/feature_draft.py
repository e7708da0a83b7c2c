"""Feature drafts: EAGLE-style drafts that read the target's own hidden states.

Draft m at position t reads f_{t−1}, the target's final (normed) hidden state at the previous
position, and the target's embedding of the current token x_t, and predicts the target's next
feature and next token (Li et al., EAGLE, arXiv 2401.15077):

    h_t = fc([f_{t−1}; e(x_t)])                       [E]   (2E -> E, with bias)
    g_t = norm(layer(h_≤t))                           [E]   (one Llama decoder layer, then RMSNorm)
    q_m(x_{t+1} | x_≤t) = softmax(g_t · W_S)          [V_d] (the target's tied embedding rows of S)

The embedding and the output head are the target's own (read from its folder, never stored with
the draft); a draft folder holds only fc and the layer (`feature_draft.json`,
`model.safetensors`, `draft_vocab.json` for S). The M drafts of a bundle share their inputs and
differ by OSD instance and DDD partition (`drafts.feature_distill`). At later steps of a round
the draft's own g_t stands in for the feature the target has not computed yet (EAGLE's
feature-level autoregression). docs/feature-drafts.md has the design and its measurements.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from server.engine.draft_vocab import DraftVocab, read_draft_vocab
from server.engine.stacked_layers import LAYER_WEIGHTS, Attend, decoder_layer, linear, rms

SPEC_FILE = "feature_draft.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 2  # 2: the output RMSNorm (norm.weight) after the layer


class FeatureDraftError(ValueError):
    """A feature draft folder that cannot be read, or does not fit its target."""


@dataclass(frozen=True)
class FeatureSpec:
    """The draft layer's shape: the target's hidden size, heads and rotary settings."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float
    rope_theta: float
    max_positions: int

    @classmethod
    def of_target(cls, cfg: dict) -> FeatureSpec:
        """The spec of a draft for a Llama-family target's config.json."""
        heads = int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5 | 4
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise FeatureDraftError(f"Feature drafts support the default rotary embedding, not {rope}.")
        return cls(
            hidden=int(cfg["hidden_size"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate=int(cfg["intermediate_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
            max_positions=int(cfg.get("max_position_embeddings", 2048)),
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight of one draft and its shape (linear weights as [in, out])."""
        E, H, Hkv, D, inter = self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate
        return {
            "fc.weight": (2 * E, E),
            "fc.bias": (E,),
            "layer.input_layernorm.weight": (E,),
            "layer.post_attention_layernorm.weight": (E,),
            "layer.self_attn.q_proj.weight": (E, H * D),
            "layer.self_attn.k_proj.weight": (E, Hkv * D),
            "layer.self_attn.v_proj.weight": (E, Hkv * D),
            "layer.self_attn.o_proj.weight": (H * D, E),
            "layer.mlp.gate_proj.weight": (E, inter),
            "layer.mlp.up_proj.weight": (E, inter),
            "layer.mlp.down_proj.weight": (inter, E),
            "norm.weight": (E,),
        }

    def parameters(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes().values())


def is_feature_draft(folder: str | Path) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def read_spec(folder: str | Path) -> FeatureSpec:
    path = Path(folder) / SPEC_FILE
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise FeatureDraftError(f"'{path}': format {raw.get('format')!r}, this epispec reads {FORMAT}.")
        return FeatureSpec(**raw["spec"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise FeatureDraftError(f"'{path}' is not a valid feature draft spec: {exc}") from exc


def rotary(spec: FeatureSpec, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin (default rotary, the target's theta) for positions [B, T] -> each [1, B, T, 1, D]"""
    D = spec.head_dim
    inv = 1.0 / spec.rope_theta ** (torch.arange(0, D, 2, device=pos.device, dtype=torch.float32) / D)
    ang = pos.float()[..., None] * inv  # [B, T, D/2]
    ang = torch.cat((ang, ang), -1)  # [B, T, D]
    return ang.cos().to(dtype)[None, :, :, None], ang.sin().to(dtype)[None, :, :, None]


def shifted_features(f: torch.Tensor) -> torch.Tensor:
    """f_{t−1} for every position t (zeros at t = 0: no position before it). [B, T, E] -> [B, T, E]"""
    return torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], 1)


def target_embedding(target_dir: str | Path) -> torch.Tensor:
    """The target's input embedding [V, E] (also its output head: the targets served are tied),
    read from its safetensors without loading the model."""
    from safetensors import safe_open

    files = sorted(Path(target_dir).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in ("model.embed_tokens.weight", "embed_tokens.weight"):
                if name in st.keys():
                    return st.get_tensor(name)
    raise FeatureDraftError(f"Target '{target_dir}' has no model.embed_tokens.weight in its safetensors.")


def check_tied(target_cfg: dict) -> None:
    if target_cfg.get("tie_word_embeddings") is False:
        raise FeatureDraftError(
            "Feature drafts need a target with tied embeddings (its head = its embedding)."
        )


class FeatureDrafts(torch.nn.Module):
    """M feature drafts stacked on a leading M axis, with the target's embedding and head rows.

    Weights are `dtype`; the output log-softmax is float32. Trainable parameters are the drafts'
    own (`self.w`); the embedding and head are buffers (the target's, frozen)."""

    def __init__(
        self,
        spec: FeatureSpec,
        weights: dict[str, torch.Tensor],  # name -> [M, *shape]
        embed: torch.Tensor,  # [V, E] the target's
        vocab: DraftVocab | None,
    ) -> None:
        super().__init__()
        self.spec, self.vocab = spec, vocab
        self.m = next(iter(weights.values())).shape[0]
        self.w = torch.nn.ParameterDict(
            {k.replace(".", "__"): torch.nn.Parameter(v) for k, v in weights.items()}
        )
        head = embed if vocab is None else embed[vocab.target_ids]  # [V_d, E]
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("head", head.t().contiguous(), persistent=False)  # [E, V_d]
        self.scale = spec.head_dim**-0.5

    def weight(self, name: str) -> torch.Tensor:
        return self.w[name.replace(".", "__")]

    def layer(self) -> dict[str, torch.Tensor]:
        return {n: self.weight("layer." + n) for n in LAYER_WEIGHTS}

    def forward(
        self, tokens: torch.Tensor, feats: torch.Tensor, pos: torch.Tensor, attend: Attend, out=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] target ids, feats [B, T, E] or [M, B, T, E] (f_{t−1} for the token at t;
        shared by the drafts, or each draft's own), pos [B, T]; `out` (rows [P], cols [P]) picks
        the positions whose outputs are wanted (None: all, P = B·T).
        -> (log q over S [P, M, V_d] float32, the predicted features g [M, P, E])"""
        s = self.spec
        dtype = self.head.dtype
        e = self.embed[tokens].to(dtype)  # [B, T, E]
        f = feats.to(dtype)
        if f.dim() == 3:
            f = f.expand(self.m, *f.shape)  # [M, B, T, E]
        x = torch.cat([f, e.expand(self.m, *e.shape)], -1)  # [M, B, T, 2E]
        h = linear(x, self.weight("fc.weight"), self.weight("fc.bias"))  # [M, B, T, E]
        cos, sin = rotary(s, pos, dtype)
        h = decoder_layer(
            self.layer(),
            h,
            cos,
            sin,
            attend,
            eps=s.rms_eps,
            heads=s.heads,
            kv_heads=s.kv_heads,
            head_dim=s.head_dim,
        )
        if out is None:
            h = h.flatten(1, 2)  # [M, P, E]
        else:
            h = h[:, out[0], out[1]]  # [M, P, E]
        g = rms(h, self.weight("norm.weight"), s.rms_eps)  # [M, P, E]: normed, as f is
        lp = torch.log_softmax(torch.matmul(g, self.head).float(), -1)  # [M, P, V_d]
        return lp.transpose(0, 1), g

    def draft_state(self, m: int) -> dict[str, torch.Tensor]:
        """Draft m's own weights (what its folder stores)."""
        return {k.replace("__", "."): v.detach()[m].contiguous() for k, v in self.w.items()}


def init_weights(
    spec: FeatureSpec, target, m: int, seed: int, fc: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """M drafts' starting weights, [M, *shape]: the layer and the output norm are copies of the
    target's last decoder layer and final norm, so that a draft is the target's last layer run on
    h_t = fc([f_{t−1}; e(x_t)]), an estimate of the residual stream entering that layer.

    fc [2E + 1, E] (weight rows, then the bias) is that estimate's least-squares fit
    (`ridge_fc`), shared by the M drafts; each draft adds its own seeded noise of 1e-3 of fc's
    scale. Without it (tiny test drafts) fc passes f_{t−1} through, plus seeded noise."""
    s = spec
    state = {k: v.detach().float() for k, v in target.model.layers[-1].state_dict().items()}
    norm = target.model.norm.weight.detach().float()
    g = torch.Generator().manual_seed(seed)
    E = s.hidden
    if fc is None:
        fc = torch.zeros(2 * E + 1, E)
        fc[:E] = torch.eye(E)
    scale = fc[: 2 * E].std() * 1e-3  # > 0: fc is the ridge fit or holds the identity
    out: dict[str, list[torch.Tensor]] = {k: [] for k in s.shapes()}
    for _ in range(m):
        for name in LAYER_WEIGHTS:
            w = state[name]
            out["layer." + name].append(w.t().contiguous() if w.dim() == 2 else w.clone())
        out["norm.weight"].append(norm.clone())
        out["fc.weight"].append(fc[: 2 * E] + torch.randn(2 * E, E, generator=g) * scale)
        out["fc.bias"].append(fc[2 * E].clone())
    return {k: torch.stack(v) for k, v in out.items()}


def ridge_fc(xtx: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """The ridge solution W [I, O] of Y ≈ W·x from sufficient statistics xtx = XᵀX [I, I] and
    xty = XᵀY [I, O] (float64; the last input column the constant 1), λ on every weight."""
    a = xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype)
    return torch.linalg.solve(a, xty).float()


def save_feature_draft(folder: str | Path, spec: FeatureSpec, state: dict[str, torch.Tensor], dtype) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
    (folder / SPEC_FILE).write_text(
        json.dumps({"kind": "feature", "format": FORMAT, "spec": asdict(spec)}, indent=1) + "\n"
    )
    return folder


def load_feature_drafts(
    paths: list[str | Path],
    target_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FeatureDrafts:
    """The drafts of `paths` stacked, with `target_dir`'s embedding. Raises FeatureDraftError
    where they differ in shape or vocabulary, or do not fit the target."""
    from safetensors.torch import load_file

    specs = [read_spec(p) for p in paths]
    if any(s != specs[0] for s in specs):
        raise FeatureDraftError("Feature drafts of one bundle must share one shape.")
    vocabs = [read_draft_vocab(p) for p in paths]
    if any(v is None for v in vocabs) != all(v is None for v in vocabs) or any(
        v is not None and not v.same_as(vocabs[0]) for v in vocabs
    ):
        raise FeatureDraftError("Feature drafts of one bundle must share one output vocabulary.")
    embed = target_embedding(target_dir).to(device, dtype)  # [V, E]
    spec = specs[0]
    if embed.shape[1] != spec.hidden:
        raise FeatureDraftError(f"Target hidden size {embed.shape[1]} is not the drafts' {spec.hidden}.")
    states = [load_file(str(Path(p) / WEIGHTS_FILE)) for p in paths]
    for p, st in zip(paths, states, strict=True):
        want = spec.shapes()
        got = {k: tuple(v.shape) for k, v in st.items()}
        if got != want:
            raise FeatureDraftError(
                f"Feature draft '{p}' has weights {sorted(set(got) ^ set(want)) or 'of other shapes'}."
            )
    weights = {k: torch.stack([st[k] for st in states]).to(device, dtype) for k in spec.shapes()}
    return FeatureDrafts(spec, weights, embed, vocabs[0]).eval().requires_grad_(False)
