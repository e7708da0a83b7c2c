"""Drafts with a reduced vocabulary: distilled on token-id documents (the target's responses),
their map written and checked, and the loss exactly KL of the teacher renormalized over S."""

from __future__ import annotations

import json

import pytest
import torch

from drafts.corpus import describe_corpus
from drafts.distill import DistillSettings, distill_drafts, distill_loss
from drafts.lm import LMShape, encode_corpus
from drafts.osd import TeacherSampler
from drafts.reduced import ReducedStudent, build_reduced_draft, choose_vocab, coverage
from drafts.responses import response_docs
from drafts.training import RunOptions
from server.engine.draft_ensemble import DraftEnsemble, RowInput, TopN
from server.engine.draft_vocab import read_draft_vocab
from server.engine.models import ModelFolderError, check_compatible, load_causal_lm, load_tokenizer

SHAPE = LMShape(hidden=64, layers=1, heads=1, intermediate=128, max_positions=256)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_loss_is_kl_of_the_teacher_renormalized_over_s(tiny_models, texts, direction):
    tok = load_tokenizer(tiny_models["target"])
    target = load_causal_lm(tiny_models["target"])
    docs = encode_corpus(texts[:20], tok)
    vocab = choose_vocab(docs, 40, tok, target.config.vocab_size)
    assert vocab.size == 40 and set(tok.all_special_ids) <= set(vocab.target_ids.tolist())
    assert 0 < coverage(docs, vocab) < 1
    student = ReducedStudent(build_reduced_draft(SHAPE, tok, vocab, 0, target, "target"), vocab)
    batch = torch.tensor([docs[0][:17]])  # [1, 17]
    teacher = TeacherSampler(target, "none")
    loss = distill_loss(student, teacher, 0, batch, direction)
    with torch.no_grad():
        lp = torch.log_softmax(target(input_ids=batch[:, :-1]).logits, -1)[..., vocab.target_ids]
        p_s = torch.log_softmax(lp, -1)  # renormalized over S
        q = student(batch[:, :-1])
        if direction == "forward":  # KL(teacher ‖ draft)
            expected = (p_s.exp() * (p_s - q)).sum(-1).mean()
        else:  # KL(draft ‖ teacher), the direction of the served bias
            expected = (q.exp() * (q - p_s)).sum(-1).mean()
    assert abs(float(loss.detach()) - float(expected)) < 1e-5
    if direction == "reverse":  # the two directions differ on an untrained draft
        assert abs(float(distill_loss(student, teacher, 0, batch).detach()) - float(expected)) > 1e-3


def test_an_unknown_loss_direction_is_refused(tiny_models, texts, tmp_path):
    target = load_causal_lm(tiny_models["target"])
    batch = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="--loss must be one of forward, reverse"):
        distill_loss(None, TeacherSampler(target, "none"), 0, batch, "sideways")
    with pytest.raises(ValueError, match="--loss must be one of"):
        distill_drafts(
            texts[:8], {}, tiny_models["target"], tmp_path, DistillSettings(drafts=2, loss="up"), SHAPE
        )


def test_reduced_drafts_from_responses_serve_in_the_ensemble(tiny_models, texts, tmp_path):
    tok = load_tokenizer(tiny_models["target"])
    records = [
        {"question": t[:40] + str(i), "prompt_ids": ids[:8], "output_ids": ids[8:]}
        for i, (t, ids) in enumerate(zip(texts[:40], encode_corpus(texts[:40], tok), strict=True))
    ]
    qs = [r["question"] for r in records]
    settings = DistillSettings(
        drafts=2, osd="lowrank", source="responses", draft_vocab=48, embed_init="target"
    )
    out = distill_drafts(
        qs,
        describe_corpus("responses", "responses", qs),
        tiny_models["target"],
        tmp_path,
        settings,
        SHAPE,
        RunOptions(steps=12, batch_size=4, seq_len=32, lr=5e-3),
        docs=response_docs(records),
    )
    check_compatible(tiny_models["target"], out)
    rec = json.loads((out[0] / "training.json").read_text())
    assert rec["draft_vocab"]["size"] == 48 and rec["loss"]["last"] < rec["loss"]["first"]
    assert rec["settings"]["loss"] == "KL(teacher renormalized over S || draft), S = the draft vocabulary"
    assert not (out[0] / "tokenizer.json").exists()  # the draft's ids are S's, not the tokenizer's
    v0, v1 = read_draft_vocab(out[0]), read_draft_vocab(out[1])
    assert v0.same_as(v1)  # one S for the whole ensemble
    ens = DraftEnsemble(out, k=2, slots=2, max_len=64, summary=TopN(None))
    res = ens.propose([RowInput("a", torch.tensor(records[0]["prompt_ids"]), 1)])[0]
    assert set(res.proposal) <= set(v0.target_ids.tolist())  # proposals are target ids in S
    assert set(res.records[0].ids.tolist()) == set(v0.target_ids.tolist())


def test_check_compatible_refuses_bad_maps(tiny_models, reduced_drafts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(reduced_drafts[0], bad)
    raw = json.loads((bad / "draft_vocab.json").read_text())
    for change, words in (
        (lambda r: r.update(target_vocab_size=r["target_vocab_size"] + 5), "maps its vocabulary"),
        (lambda r: r.update(target_vocab_size=7), "must lie in"),
        (lambda r: r.update(target_ids=r["target_ids"][:-1]), "lists"),
        (lambda r: r.update(tokenizer_digest="0" * 16), "another tokenizer"),
        (lambda r: r.update(unknown=10**6), "unknown"),
    ):
        r = json.loads(json.dumps(raw))
        change(r)
        (bad / "draft_vocab.json").write_text(json.dumps(r))
        with pytest.raises(ModelFolderError, match=words):
            check_compatible(tiny_models["target"], [bad])
    with pytest.raises(ValueError, match="all the same"):
        DraftEnsemble([reduced_drafts[0], tiny_models["drafts"][1]], k=2, slots=1, max_len=32)


def test_full_vocabulary_copy_keeps_logits_on_s(tiny_models, reduced_drafts, tmp_path):
    """The expanded copy (vLLM's draft_model baseline) has the reduced draft's logits on S, logit 0
    elsewhere, and reads tokens outside S as the reduced draft does."""
    from drafts.reduced import full_vocabulary_copy

    out = full_vocabulary_copy(reduced_drafts[0], tiny_models["target"], tmp_path / "full")
    check_compatible(tiny_models["target"], [out])  # a plain full-vocabulary draft now
    vocab = read_draft_vocab(reduced_drafts[0])
    small, big = load_causal_lm(reduced_drafts[0]), load_causal_lm(out)
    x = torch.tensor([[1, 5, 7, 300, 9, 11]])  # some ids outside S
    with torch.no_grad():
        want = small(input_ids=vocab.to_draft(x)).logits  # [1, 6, V_d]
        got = big(input_ids=x).logits  # [1, 6, V]
    assert (got[..., vocab.target_ids] - want).abs().max() < 1e-5
    outside = torch.ones(vocab.target_vocab_size, dtype=torch.bool)
    outside[vocab.target_ids] = False
    assert got[..., outside].abs().max() == 0


def test_init_and_a_reduced_vocabulary_are_refused_together(tiny_models, texts, tmp_path):
    """--init is a model over the target's vocabulary: wrapping it as a reduced draft would feed it S's ids."""
    settings = DistillSettings(drafts=2, draft_vocab=48, init=tiny_models["drafts"][0])
    with pytest.raises(ValueError, match="cannot be combined"):
        distill_drafts(
            texts,
            describe_corpus("tiny", "train", texts),
            tiny_models["target"],
            tmp_path,
            settings,
            SHAPE,
            RunOptions(steps=1),
        )
    assert not any(tmp_path.iterdir())
