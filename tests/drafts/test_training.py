"""The training loop: losses fall, checkpoints resume to the very run that was interrupted, and a
checkpoint from other settings is refused."""

from __future__ import annotations

import random

import pytest
import torch

from drafts.lm import LMShape, batches, build_lm, encode_corpus, lm_loss, train_lm
from drafts.training import CHECKPOINT, TrainSettings, loss_summary, train_loop
from server.engine.models import load_tokenizer

SHAPE = LMShape(hidden=64, layers=1, heads=1, intermediate=128, max_positions=128)


@pytest.fixture(scope="module")
def setup(tiny_models, texts):
    tok = load_tokenizer(tiny_models["tokenizer"])
    return tok, encode_corpus(texts, tok)


def test_lm_loss_falls(setup):
    tok, docs = setup
    model = build_lm(SHAPE, tok, seed=0)
    losses = train_lm(model, docs, 40, batch_size=8, seq_len=32, lr=5e-3, seed=0)
    s = loss_summary(losses, window=8)
    assert s["steps"] == 40 and s["last"] < s["first"] - 1.0  # from ~log V to well below


class Interrupt(Exception):
    pass


def _run(tok, docs, run_dir, stop_at=None, steps=8):
    model = build_lm(SHAPE, tok, seed=1)
    settings = TrainSettings(steps=steps, batch_size=4, seq_len=16, lr=1e-2, seed=0, checkpoint_every=3)

    def loss_fn(step, b):
        if step == stop_at:
            raise Interrupt
        return lm_loss(model, b)

    losses = train_loop(model, batches(docs, 4, 16, random.Random(0)), loss_fn, settings, run_dir=run_dir)
    return model, losses


def test_resume_continues_the_interrupted_run(setup, tmp_path):
    tok, docs = setup
    ref, ref_losses = _run(tok, docs, tmp_path / "ref")
    with pytest.raises(Interrupt):
        _run(tok, docs, tmp_path / "cut", stop_at=7)  # checkpoints at steps 3 and 6
    assert (tmp_path / "cut" / CHECKPOINT).exists()
    resumed, losses = _run(tok, docs, tmp_path / "cut")
    assert losses[:6] == ref_losses[:6]  # restored from the checkpoint, not recomputed
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), k


def test_checkpoint_of_other_settings_is_refused(setup, tmp_path):
    tok, docs = setup
    with pytest.raises(Interrupt):
        _run(tok, docs, tmp_path, stop_at=4)
    with pytest.raises(ValueError, match="other settings"):
        _run(tok, docs, tmp_path, steps=9)
