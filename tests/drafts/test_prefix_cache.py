"""Distillation with the teacher's deterministic prefix cached (OSD noise in the last layers)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from drafts.corpus import describe_corpus
from drafts.distill import DistillSettings, distill_drafts, distill_loss
from drafts.lm import LMShape
from drafts.osd import TeacherSampler
from drafts.prefix_cache import FILE, CachedBatch, cached_batches, pack_windows, teacher_prefix
from drafts.training import RunOptions
from server.engine.models import load_causal_lm

SHAPE = LMShape(hidden=64, layers=1, heads=1, intermediate=128, max_positions=256)


def test_windows_and_batches_cover_the_stream():
    docs = [list(range(i * 10, i * 10 + 7)) for i in range(9)]  # 63 tokens
    w = pack_windows(docs, 9, random.Random(0))  # [6, 10]
    assert w.shape == (6, 10) and sorted(w.flatten().tolist()) == sorted(
        t for d in docs for t in d if t in set(w.flatten().tolist())
    )
    it = cached_batches(w, torch.zeros(6, 9, 4), 4, random.Random(0))
    b = next(it)
    assert isinstance(b, CachedBatch) and b.ids.shape == (4, 10) and b.prefix.shape == (4, 9, 4)
    with pytest.raises(ValueError, match="not one window"):
        pack_windows([[1, 2]], 9, random.Random(0))
    with pytest.raises(ValueError, match="lower --batch-size"):
        next(cached_batches(w, torch.zeros(6, 9, 4), 8, random.Random(0)))


def test_the_cached_prefix_is_reused_and_gives_the_uncached_loss(tiny_models, tmp_path):
    target = load_causal_lm(tiny_models["target"])
    teacher = TeacherSampler(target, "lowrank", noise=0.2, layers=1)
    windows = torch.randint(3, 300, (5, 17), generator=torch.Generator().manual_seed(0))
    prefix = teacher_prefix(teacher, windows, tmp_path, batch_size=2)  # [5, 16, E]
    assert (tmp_path / FILE).exists()
    teacher.prefix = None  # a second call must read the file, not run the model
    assert torch.equal(teacher_prefix(teacher, windows, tmp_path), prefix)
    del teacher.prefix
    student = load_causal_lm(tiny_models["drafts"][0])
    batch = CachedBatch(windows[:2], prefix[:2])
    cached = distill_loss(student, teacher, 7, batch)
    assert torch.equal(cached, distill_loss(student, teacher, 7, windows[:2]))


def test_distill_with_noise_in_the_last_layer(tiny_models, texts, tmp_path):
    settings = DistillSettings(drafts=2, osd="lowrank", noise=0.2, noise_layers=1)
    out = distill_drafts(
        texts[:40],
        describe_corpus("corpus", "train", texts[:40]),
        tiny_models["target"],
        tmp_path,
        settings,
        SHAPE,
        RunOptions(steps=10, batch_size=4, seq_len=32, lr=5e-3),
    )
    rec = json.loads((out[0] / "training.json").read_text())
    assert rec["osd"]["layers"] == 1 and rec["osd"]["instances"] == 10
    assert rec["loss"]["last"] < rec["loss"]["first"]
    assert not (out[0] / FILE).exists()  # the cache goes when the draft is finished
