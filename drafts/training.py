"""One training loop for targets and drafts: AdamW, cosine learning rate, gradient clipping, a
progress bar (loss, tokens/s, ETA), and resumable checkpoints.

The loop knows nothing about what is learned: the caller passes `loss_fn(step, batch) -> loss`
and an endless batch iterator. A checkpoint (`checkpoint.pt` in the run folder) holds the model,
the optimizer, the step and the losses so far; a run restarted with the same settings continues
where it stopped. The batch stream is replayed deterministically up to that step (batches are
cheap to build), and step-dependent randomness (OSD teacher draws) is seeded from the step, so a
resumed run is the run that was interrupted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from drafts.folder import CHECKPOINT, RECORD


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 10
    seed: int = 0
    checkpoint_every: int = 200  # steps; 0 = never

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunOptions:
    """How a command trains: length (epochs, or steps when given), batches, device, saving."""

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    device: str = "cpu"
    checkpoint_every: int = 200
    dtype: str = "float32"  # of the saved weights
    progress: bool = False

    def settings(self, steps: int, seed: int) -> TrainSettings:
        return TrainSettings(
            steps=steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=self.lr,
            seed=seed,
            checkpoint_every=self.checkpoint_every,
        )


def cosine_lr(step: int, total: int, peak: float, warmup: int = 10) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine.")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, not '{device}'.")
    return torch.device(device)


def train_loop(
    model,
    batches: Iterator[torch.Tensor],
    loss_fn: Callable[[int, torch.Tensor], torch.Tensor],
    settings: TrainSettings,
    *,
    run_dir: str | Path | None = None,
    fingerprint: dict | None = None,
    progress: bool = False,
    desc: str = "train",
) -> list[float]:
    """Train `model` for settings.steps steps; returns every step's loss (including resumed ones).

    With `run_dir`, checkpoints go there every settings.checkpoint_every steps and a matching
    checkpoint found there is resumed. `fingerprint` (JSON-able) identifies the run: a checkpoint
    made with a different one is refused rather than silently mixed in.
    """
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    ident = json.dumps({"settings": settings.as_dict(), **(fingerprint or {})}, sort_keys=True)
    start, losses = 0, []
    ckpt = Path(run_dir) / CHECKPOINT if run_dir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["ident"] != ident:
            raise ValueError(
                f"Checkpoint '{ckpt}' belongs to a run with other settings; delete it or use "
                "another output folder."
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, losses = state["step"], list(state["losses"])
    for _ in range(start):  # replay the data stream up to the resumed step
        next(batches)

    model.train()
    bar = tqdm(
        range(start, settings.steps),
        initial=start,
        total=settings.steps,
        disable=not progress,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
    )
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, settings.steps, settings.lr, settings.warmup)
        batch = next(batches)
        loss = loss_fn(step, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        tokens += (batch.ids if hasattr(batch, "ids") else batch)[:, 1:].numel()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        done = step + 1
        if (
            ckpt is not None
            and settings.checkpoint_every
            and done % settings.checkpoint_every == 0
            and done < settings.steps
        ):
            _save_checkpoint(ckpt, model, opt, done, losses, ident)
    model.eval()
    return losses


def _save_checkpoint(path: Path, model, opt, step: int, losses: list[float], ident: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "losses": losses,
            "ident": ident,
        },
        tmp,
    )
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken checkpoint


def finish_run(run_dir: str | Path) -> None:
    """Remove the checkpoint once the final model is saved."""
    (Path(run_dir) / CHECKPOINT).unlink(missing_ok=True)


def loss_summary(losses: list[float], window: int = 20) -> dict:
    """First and last window means: what a training record needs to show that loss fell."""
    if not losses:
        return {"steps": 0}
    w = max(1, min(window, len(losses) // 2 or 1))
    return {"steps": len(losses), "first": sum(losses[:w]) / w, "last": sum(losses[-w:]) / w}


def write_record(model_dir: str | Path, record: dict) -> Path:
    """The training record saved beside a model: settings, seeds, data, losses."""
    path = Path(model_dir) / RECORD
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_record(model_dir: str | Path) -> dict:
    path = Path(model_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}
