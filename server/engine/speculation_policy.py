"""How many tokens each decoding row proposes in a step (`--speculation`; docs/benchmark.md#speculation-that-adapts-to-load).

Whatever a row proposes, the drafts run one step per emitted token, so every emitted token keeps
its exact eu, bias and variance; what changes is how many positions the target verifies. A row
that proposes none is verified at its emitted position only (vLLM: a row with 0 draft tokens in
the step's speculative metadata, sampled from its bonus position).

- `Fixed`: every row proposes the bundle's k (vLLM's own behaviour).
- `Off`: no row proposes; the drafts only score.
- `Adaptive`: per step, the proposals that raise the step's expected tokens per second.

The adaptive cost model: a decode step computing T positions takes a + b·T seconds (`StepCost`,
least squares over recent decode steps, exponentially forgotten), and the proposer's own time o
is paid whatever is proposed. Row r's j-th drafted token is emitted with probability
g = ∏_{s≤j} α(c_s), c_s the drafts' mixture probability q̄ of drafted token s and α(c) the
measured acceptance rate of drafted tokens in c's bin (`Acceptance`): where the drafts disagree,
q̄ of their pick is low and so is α. The ensemble asks before it drafts past the first token, so
c_0 stands for every c_s there, and no draft step runs beyond the longest proposal chosen. With E the expected tokens and t = a + b·T + o the expected
time of the step, one more proposed token raises E / t iff g·t > b·E; tokens are added in
decreasing g while that holds (equal cost b each, so this maximises E / t).

Rows with a seed (their own random generator in vLLM) always propose the full k: their tokens
depend on the proposals the rejection sampler sees, and a seed promises the same tokens alone or
batched, under any load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

Speculation = Literal["adaptive", "fixed", "off"]
SPECULATION_POLICIES: tuple[str, ...] = get_args(Speculation)
DEFAULT_SPECULATION: Speculation = "adaptive"

CONFIDENCE_BINS = (0.2, 0.4, 0.6, 0.8)  # upper edges; the last bin is [0.8, 1]
EXPLORE_EVERY = 16  # adaptive: every 16th step, half the rows flip their choice (keeps b measurable)


@dataclass
class Acceptance:
    """Acceptance rate of drafted tokens by the drafts' confidence q̄ ∈ [0, 1], per bin, counted
    with forgetting (`decay` per observed token) from a prior of `prior` accepted out of
    `prior_n`. A drafted token counts once it was tested: all tokens before it were accepted."""

    decay: float = 0.995
    prior: float = 0.5
    prior_n: float = 2.0
    accepted: list[float] = field(default_factory=list)
    tested: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(CONFIDENCE_BINS) + 1
        self.accepted = self.accepted or [self.prior * self.prior_n] * n
        self.tested = self.tested or [self.prior_n] * n

    @staticmethod
    def bin(c: float) -> int:
        return next((i for i, edge in enumerate(CONFIDENCE_BINS) if c < edge), len(CONFIDENCE_BINS))

    def rate(self, c: float) -> float:
        i = self.bin(c)
        return self.accepted[i] / self.tested[i]

    def observe(self, confidences: list[float], accepted: int) -> None:
        """A verified proposal: its tokens' confidences and how many of them the target accepted."""
        for s, c in enumerate(confidences[: accepted + 1]):
            i = self.bin(c)
            self.accepted[i] = self.decay * self.accepted[i] + (s < accepted)
            self.tested[i] = self.decay * self.tested[i] + 1.0


@dataclass
class StepCost:
    """seconds ≈ a + b·positions of a decode step, by exponentially weighted least squares
    (`decay` per step). The fit moves only when the positions seen vary enough to separate a from
    b (relative spread ≥ `min_spread`); until the first such fit there is none (None)."""

    decay: float = 0.98
    min_steps: int = 8
    min_spread: float = 0.05
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # Σw, ΣwT, ΣwT², Σwt, ΣwTt
    steps: int = 0
    fitted: tuple[float, float] | None = None

    def observe(self, positions: int, seconds: float) -> None:
        T = float(positions)
        self.sums = [self.decay * s for s in self.sums]
        for i, v in enumerate((1.0, T, T * T, seconds, T * seconds)):
            self.sums[i] += v
        self.steps += 1
        w, st, stt, sy, sty = self.sums
        mean = st / w
        var = stt / w - mean * mean
        if self.steps < self.min_steps or var < (self.min_spread * mean) ** 2:
            return
        b = (sty / w - mean * sy / w) / var
        a = sy / w - b * mean
        if b < 0:  # noise: no per-position cost measurable
            a, b = sy / w, 0.0
        elif a < 0:
            a, b = 0.0, sty / stt
        self.fitted = (a, b)


class Fixed:
    """Every row proposes all the tokens the drafts drafted (k, or less where the history nears
    max_model_len)."""

    name = "fixed"

    def choose(self, confidences: list[list[float]], seeded: list[bool]) -> list[int]:
        return [len(c) for c in confidences]

    def observe_step(self, positions: int, seconds: float) -> None:
        pass

    def observe_proposer(self, seconds: float) -> None:
        pass

    def observe_verified(self, confidences: list[float], accepted: int) -> None:
        pass

    def describe(self) -> str:
        return self.name


class Off(Fixed):
    """No row proposes (seeded ones neither: with no proposal at all, nothing depends on load)."""

    name = "off"

    def choose(self, confidences: list[list[float]], seeded: list[bool]) -> list[int]:
        return [0] * len(confidences)


class Adaptive(Fixed):
    """The proposals that pay under `StepCost` and `Acceptance` (see the module docstring)."""

    name = "adaptive"

    def __init__(self) -> None:
        self.cost = StepCost()
        self.acceptance = Acceptance()
        self.own_s = 0.0  # the proposer's time per step (exponential average)
        self.steps = 0
        self.proposed = 0  # tokens proposed, over all steps (for logs and tests)
        self.rows = 0  # rows decided, over all steps

    def observe_step(self, positions: int, seconds: float) -> None:
        self.cost.observe(positions, seconds)

    def observe_proposer(self, seconds: float) -> None:
        self.own_s = seconds if not self.own_s else 0.9 * self.own_s + 0.1 * seconds

    def observe_verified(self, confidences: list[float], accepted: int) -> None:
        self.acceptance.observe(confidences, accepted)

    def describe(self) -> str:
        """The fit and the choices so far, for the log."""
        fit = "none yet"
        if self.cost.fitted is not None:
            a, b = self.cost.fitted
            fit = f"{1000 * a:.2f} ms + {1000 * b:.3f} ms/position"
        rates = ", ".join(
            f"{a / t:.2f}" for a, t in zip(self.acceptance.accepted, self.acceptance.tested, strict=True)
        )
        return (
            f"adaptive: decode step {fit}; proposer {1000 * self.own_s:.2f} ms/step; acceptance by "
            f"q̄ bin {rates}; {self.proposed / max(self.rows, 1):.3f} tokens proposed per row over "
            f"{self.steps} steps"
        )

    def choose(self, confidences: list[list[float]], seeded: list[bool]) -> list[int]:
        self.steps += 1
        ks = self._choose(confidences, seeded)
        if self.steps % EXPLORE_EVERY == 0:  # flip every other free row: positions vary
            flip = (self.steps // EXPLORE_EVERY) % 2
            for b, c in enumerate(confidences):
                if not seeded[b] and b % 2 == flip:
                    ks[b] = 0 if ks[b] else len(c)
        self.proposed += sum(ks)
        self.rows += len(ks)
        return ks

    def _choose(self, confidences: list[list[float]], seeded: list[bool]) -> list[int]:
        if self.cost.fitted is None:  # nothing measured yet: speculate as fixed k would
            return [len(c) for c in confidences]
        a, b = self.cost.fitted
        ks = [len(c) if s else 0 for c, s in zip(confidences, seeded, strict=True)]
        gains = []  # (g, row, j): the j-th token of a free row, emitted with probability g
        expected, positions = float(len(ks)), len(ks) + sum(ks)
        for r, (c, s) in enumerate(zip(confidences, seeded, strict=True)):
            g = 1.0
            for j, conf in enumerate(c):
                g *= self.acceptance.rate(conf)
                if s:
                    expected += g
                else:
                    gains.append((g, r, j))
        gains.sort(key=lambda x: (-x[0], x[2]))
        seconds = a + b * positions + self.own_s
        for g, r, j in gains:
            if ks[r] != j or g * seconds <= b * expected or math.isclose(g * seconds, b * expected):
                continue
            ks[r] += 1
            expected += g
            seconds += b
        return ks


def make(name: Speculation):
    """The policy named by `--speculation`."""
    policies = {"adaptive": Adaptive, "fixed": Fixed, "off": Off}
    if name not in policies:
        raise ValueError(f"speculation must be one of {', '.join(SPECULATION_POLICIES)}, not '{name}'.")
    return policies[name]()
