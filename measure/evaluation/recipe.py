"""What an evaluation trains: a tokenizer, a deep ensemble of N targets (member 0 is the served
target), and three sets of M drafts (ours = OSD + DDD, and the no-DDD and no-OSD ablations).

Training calls the drafts package (`train_ensemble`, `distill_drafts`); every folder is reused
when a finished model is already there, so an interrupted or repeated run only trains what is
missing. Model folders given on the command line replace the ones this module would train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from drafts.distill import DistillSettings, distill_drafts
from drafts.lm import LMShape
from drafts.targets import train_ensemble
from drafts.tokenizer import train_tokenizer
from drafts.training import RunOptions


@dataclass(frozen=True)
class Recipe:
    name: str
    train_records: int  # training documents (GSM8K train head, or synthetic)
    val_questions: int  # held-out train questions: threshold and baseline choices
    test_questions: int  # GSM8K test head
    vocab_size: int
    target_shape: LMShape
    draft_shape: LMShape
    ensemble: int  # N
    drafts: int  # M
    target_steps: int
    draft_steps: int
    batch_size: int
    seq_len: int
    osd: str  # OSD teacher for ours and no-DDD: "ensemble", "lowrank" or "dropout"
    max_new_tokens: int
    tokur_samples: int  # S
    tokur_noise: tuple[float, ...]  # σ candidates, chosen on validation
    lr: float = 3e-3

    def as_dict(self) -> dict:
        return asdict(self)


QUICK = Recipe(
    name="quick",
    train_records=800,
    val_questions=20,
    test_questions=30,
    vocab_size=512,
    target_shape=LMShape(hidden=128, layers=2, heads=2, intermediate=256, max_positions=512),
    draft_shape=LMShape(hidden=64, layers=1, heads=1, intermediate=128, max_positions=512),
    ensemble=5,
    drafts=4,
    target_steps=100,
    draft_steps=100,
    batch_size=16,
    seq_len=128,
    osd="ensemble",
    max_new_tokens=96,
    tokur_samples=5,
    tokur_noise=(0.1, 0.3),
)
FULL = Recipe(  # sized for ~20-30 minutes on 2 busy CPU cores; the demo bundle's 256-wide target
    # costs ~15 minutes per model here, so a 5-member ensemble of it does not fit an hour
    name="full",
    train_records=7373,
    val_questions=50,
    test_questions=100,
    vocab_size=1024,
    target_shape=LMShape(hidden=128, layers=2, heads=2, intermediate=256, max_positions=512),
    draft_shape=LMShape(hidden=64, layers=1, heads=1, intermediate=128, max_positions=512),
    ensemble=5,
    drafts=4,
    target_steps=400,
    draft_steps=400,
    batch_size=16,
    seq_len=128,
    osd="ensemble",
    max_new_tokens=160,
    tokur_samples=5,
    tokur_noise=(0.05, 0.1, 0.2, 0.4),
)
RECIPES = {"quick": QUICK, "full": FULL}


def with_overrides(recipe: Recipe, **overrides) -> Recipe:
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class ModelPaths:
    tokenizer: Path
    ensemble: list[Path]
    draft_sets: dict[str, list[Path]]  # "ours", "no_ddd", "no_osd"

    @property
    def target(self) -> Path:
        return self.ensemble[0]

    def as_dict(self) -> dict:
        return {
            "target": str(self.target),
            "ensemble": [str(p) for p in self.ensemble],
            "draft_sets": {k: [str(p) for p in v] for k, v in self.draft_sets.items()},
        }


DRAFT_SETS = ("ours", "no_ddd", "no_osd")


def _options(recipe: Recipe, steps: int, progress: bool) -> RunOptions:
    return RunOptions(
        steps=steps,
        batch_size=recipe.batch_size,
        seq_len=recipe.seq_len,
        lr=recipe.lr,
        checkpoint_every=0,
        progress=progress,
    )


def prepare(
    recipe: Recipe,
    texts: list[str],
    corpus: dict,
    work: Path,
    *,
    ensemble: list[str] | None = None,
    draft_sets: dict[str, list[str]] | None = None,
    progress: bool = True,
) -> ModelPaths:
    """Train (or reuse) every model the evaluation needs under `work`."""
    given = {k: [Path(p) for p in v] for k, v in (draft_sets or {}).items() if v}
    if ensemble:
        members = [Path(p) for p in ensemble]
        tok_dir = members[0]
    else:
        tok_dir = work / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            train_tokenizer(texts, recipe.vocab_size, tok_dir)
        members = train_ensemble(
            texts,
            corpus,
            tok_dir,
            work / "ensemble",
            recipe.ensemble,
            recipe.target_shape,
            _options(recipe, recipe.target_steps, progress),
        )
    target = members[0]
    settings = {
        "ours": DistillSettings(drafts=recipe.drafts, osd=recipe.osd, ddd=True),
        "no_ddd": DistillSettings(drafts=recipe.drafts, osd=recipe.osd, ddd=False),
        "no_osd": DistillSettings(drafts=recipe.drafts, osd="none", ddd=True),
    }
    sets = {}
    for name in DRAFT_SETS:
        if name in given:
            sets[name] = given[name]
            continue
        s = settings[name]
        if s.osd == "ensemble":
            s = replace(s, ensemble=tuple(str(m) for m in members))
        sets[name] = distill_drafts(
            texts,
            corpus,
            target,
            work / f"drafts_{name}",
            s,
            recipe.draft_shape,
            _options(recipe, recipe.draft_steps, progress),
        )
    return ModelPaths(Path(tok_dir), list(members), sets)
