"""`epispec bench`: uncertainty for free? The same target and prompts served four ways, side by side.

    vllm-target-alone   plain vLLM, no speculation                       (the baseline)
    vllm-draft-model    vLLM's own `draft_model` speculation, one draft  (speculation alone)
    epispec             our vLLM engine: M drafts as the proposer + EU   (the product)
    reference           the exact PyTorch engine                         (context, exact EU)

Each config runs in its own subprocess (`runners.py`) so its peak memory is its own; the
parent (`cli.py`) runs them one after another, adds the EU error of `epispec` against exact
values (`eu_error.py`) and writes the table, JSON and plot (`report.py`).
"""
