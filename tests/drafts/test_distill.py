"""OSD + DDD distillation end to end on tiny models: losses fall, records say what happened,
partitions are disjoint and covering, ablations behave as named, bad inputs are refused."""

from __future__ import annotations

import json

import pytest

from drafts.corpus import describe_corpus, text_hash
from drafts.distill import PARTITION, DistillSettings, distill_drafts
from drafts.lm import LMShape
from drafts.training import RunOptions
from server.engine.models import ModelFolderError, check_compatible, load_causal_lm

SHAPE = LMShape(hidden=64, layers=1, heads=1, intermediate=128, max_positions=256)


def _distill(tiny, texts, out, steps=12, **kw):
    settings = DistillSettings(**{"drafts": 2, "osd": "lowrank", **kw})
    return distill_drafts(
        texts,
        describe_corpus("tiny", "train", texts),
        tiny["target"],
        out,
        settings,
        SHAPE,
        RunOptions(steps=steps, batch_size=8, seq_len=32, lr=5e-3),
    )


def _record(folder):
    return json.loads((folder / "training.json").read_text())


@pytest.fixture(scope="module")
def osd_ddd(tiny_models, texts, tmp_path_factory):
    return _distill(tiny_models, texts, tmp_path_factory.mktemp("osd_ddd"), steps=20)


def test_osd_ddd_drafts_learn_and_record(osd_ddd, tiny_models, texts):
    check_compatible(tiny_models["target"], osd_ddd)  # same tokenizer and vocabulary as the target
    hashes = []
    for m, folder in enumerate(osd_ddd):
        r = _record(folder)
        assert r["loss"]["last"] < r["loss"]["first"] - 0.5
        assert r["osd"]["mode"] == "lowrank" and r["osd"]["instances"] == 20  # a new teacher every step
        assert r["ddd"]["enabled"] and r["ddd"]["partition"] == m and r["ddd"]["of"] == 2
        part = json.loads((folder / PARTITION).read_text())
        assert part["digest"] == r["ddd"]["digest"]
        hashes.append(set(part["hashes"]))
        load_causal_lm(folder)  # transformers loads it
    assert hashes[0].isdisjoint(hashes[1])
    assert hashes[0] | hashes[1] == {text_hash(t) for t in texts}


def test_rerun_keeps_finished_drafts(osd_ddd, tiny_models, texts):
    before = [f.joinpath("model.safetensors").stat().st_mtime_ns for f in osd_ddd]
    again = _distill(tiny_models, texts, osd_ddd[0].parent, steps=20)
    assert [f.joinpath("model.safetensors").stat().st_mtime_ns for f in again] == before


def test_ablations(tiny_models, texts, tmp_path):
    no_osd = _distill(tiny_models, texts, tmp_path / "no_osd", steps=6, osd="none")
    assert _record(no_osd[0])["osd"]["instances"] == 1  # the one fixed target
    no_ddd = _distill(tiny_models, texts, tmp_path / "no_ddd", steps=6, ddd=False)
    r0, r1 = _record(no_ddd[0]), _record(no_ddd[1])
    assert not r0["ddd"]["enabled"] and r0["ddd"]["digest"] == r1["ddd"]["digest"]
    assert r0["ddd"]["documents"] == len(texts)


def test_synthetic_data_and_init_from_a_model(tiny_models, texts, tmp_path):
    out = _distill(
        tiny_models,
        texts[:16],
        tmp_path,
        steps=4,
        osd="dropout",
        source="synthetic",
        max_new_tokens=12,
        init=tiny_models["drafts"][0],
    )
    r = _record(out[0])
    assert r["settings"]["source"] == "synthetic" and r["init"] == tiny_models["drafts"][0]
    assert r["osd"]["mode"] == "dropout" and r["osd"]["instances"] == 4
    assert r["parameters"] == _record_params(tiny_models["drafts"][0])


def _record_params(folder):
    from server.engine.models import count_parameters

    return count_parameters(folder)


def test_ensemble_osd(tiny_models, texts, tmp_path):
    out = _distill(
        tiny_models,
        texts,
        tmp_path,
        steps=6,
        drafts=1,
        osd="ensemble",
        ensemble=(tiny_models["target"], tiny_models["target"]),
    )
    osd = _record(out[0])["osd"]
    assert osd["members"] == 2 and sum(osd["draws_per_member"].values()) == 6


def test_bad_inputs(tiny_models, texts, tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        _distill(tiny_models, texts, tmp_path / "a", drafts=0)
    with pytest.raises(ValueError, match="empty corpus"):
        _distill(tiny_models, [], tmp_path / "b")
    with pytest.raises(ModelFolderError, match="does not exist"):
        _distill(tiny_models, texts, tmp_path / "c", init=str(tmp_path / "nowhere"))


def test_init_with_another_tokenizer_is_refused(tiny_models, texts, tmp_path):
    from drafts.lm import build_lm, save_lm
    from drafts.tokenizer import train_tokenizer

    other_tok = train_tokenizer([t[::-1] for t in texts], vocab_size=400, out_dir=tmp_path / "tok")
    save_lm(build_lm(SHAPE, other_tok, seed=0), other_tok, tmp_path / "other")
    with pytest.raises(ModelFolderError, match="different tokenizer|vocab_size"):
        _distill(tiny_models, texts, tmp_path / "d", init=str(tmp_path / "other"))
