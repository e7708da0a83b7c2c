"""What a model folder written by `epispec drafts` holds: the names of its files, in one place.

A target or draft folder is a Hugging Face model folder (config, weights, tokenizer files) plus
epispec's own records beside it:

- `training.json` (`RECORD`): seed, settings, data and losses of the run that made the model
- `partition.json` (`PARTITION`, drafts): the hashes of the documents of its DDD partition
- `draft_vocab.json` (`DRAFT_VOCAB`, reduced drafts): the target id of each draft id; its reader
  and schema are the server's (`server/engine/draft_vocab.py`), which serves such drafts
- `feature_draft.json` (`FEATURE_DRAFT`, feature drafts, which have no `config.json`): the draft's
  shape and what it reads of the target; its reader is `server/engine/feature_draft.py`
- `checkpoint.pt` (`CHECKPOINT`) and `teacher_prefix.pt` (`TEACHER_PREFIX`): training state of an
  unfinished run, removed when it finishes; never copied into a bundle

A bundle (`drafts/bundle.py`) copies `MODEL_FILES` of each model and the target's
`TOKENIZER_FILES`.
"""

from __future__ import annotations

from server.engine.draft_vocab import FILE as DRAFT_VOCAB
from server.engine.feature_draft import SPEC_FILE as FEATURE_DRAFT

RECORD = "training.json"
PARTITION = "partition.json"
CHECKPOINT = "checkpoint.pt"
TEACHER_PREFIX = "teacher_prefix.pt"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# what a model folder needs at serving time (no checkpoints, no optimizer state)
MODEL_FILES = (
    "config.json",
    FEATURE_DRAFT,
    "generation_config.json",
    "model.safetensors",
    *TOKENIZER_FILES,
    RECORD,
    PARTITION,
    DRAFT_VOCAB,
)
