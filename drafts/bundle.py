"""Writing bundles: the folder that `epispec serve --bundle DIR` and `epispec generate --bundle DIR`
load. Its layout and the schema of its `bundle.json` are `server.bundle`'s (one module reads and
writes the manifest); this module copies the models and fills the manifest in.

With `target_source` (a `server.hub.Source`) the target is not copied: the manifest names it by
source ({"source": {package, version, file, sha256}} instead of "path") and the server prepares
it in its model cache on load.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from drafts.folder import MODEL_FILES, PARTITION, TOKENIZER_FILES
from drafts.training import read_record
from server.bundle import Manifest, Thresholds, write_manifest
from server.engine.feature_draft import is_feature_draft, read_spec
from server.engine.models import (
    ModelFolderError,
    check_compatible,
    count_parameters,
    load_tokenizer,
    model_config,
)


def write_bundle(
    target: str | Path | None,
    drafts: list[str | Path],
    out: str | Path,
    *,
    thresholds: dict | None = None,
    dtype: str | None = None,
    force: bool = False,
    target_source=None,
    num_speculative_tokens: int | None = None,
) -> dict:
    """Copy target and drafts into `out`, write bundle.json, return the manifest.

    `target_source` (a server.hub.Source): name the target by source instead of copying it;
    `target` may then be None (the source is prepared in the model cache and read from there).
    `num_speculative_tokens`: the drafts' best k, recorded as `speculation` (serve's default).
    Raises ValueError or ModelFolderError for bad input (SourceError is a ValueError).
    """
    if num_speculative_tokens is not None and num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}.")
    if len(drafts) < 1:
        raise ValueError("A bundle needs at least one draft (M >= 1).")
    thresholds = Thresholds.model_validate(thresholds or {})  # ValueError naming a bad key
    if target_source is not None and target is None:
        from server.hub.prepare import prepare

        target = prepare(target_source)
    if target is None:
        raise ValueError("A bundle needs a target folder or a target source.")
    check_compatible(target, list(drafts))  # missing folders, vocab or tokenizer mismatch
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not force:
            raise ValueError(f"Output folder '{root}' is not empty; pass --force to replace it.")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if target_source is None:
        _copy_model(target, root / "target", dtype)
    for m, d in enumerate(drafts):
        _copy_model(d, root / "drafts" / f"draft{m}", dtype)
    (root / "tokenizer").mkdir()
    tokenizer_src = Path(target) if target_source is not None else root / "target"
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy2(tokenizer_src / name, root / "tokenizer" / name)

    d_entries = [_entry(root, f"drafts/draft{m}") for m in range(len(drafts))]
    for e in d_entries:
        if (root / e["path"] / PARTITION).exists():
            e["partition"] = f"{e['path']}/{PARTITION}"
    manifest = Manifest(
        target=_entry(root, "target") if target_source is None else _source_entry(target_source, target),
        drafts=d_entries,
        tokenizer={"path": "tokenizer", "vocab_size": len(load_tokenizer(root / "tokenizer"))},
        training=aggregate_training([e["training"] for e in d_entries]),
        thresholds=thresholds,
        calibrated=bool(thresholds.as_dict()),
        speculation={"num_speculative_tokens": num_speculative_tokens},
        versions=_versions(),
        bytes=sum(f.stat().st_size for f in root.rglob("*") if f.is_file()),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_manifest(root, manifest)
    return manifest.as_json()


def aggregate_training(records: list[dict]) -> dict:
    """The bundle-level {osd, ddd} summary of the drafts' training records."""
    osd = [r.get("osd") or {} for r in records]
    ddd = [r.get("ddd") or {} for r in records]
    return {
        "osd": {
            "mode": _common([o.get("mode") for o in osd]),
            **{
                k: _common([o.get(k) for o in osd])
                for k in ("noise", "rank", "members")
                if any(k in o for o in osd)
            },
            "instances_per_draft": [o.get("instances") for o in osd],
        },
        "ddd": {
            "enabled": _common([d.get("enabled") for d in ddd]),
            "rule": _common([d.get("rule") for d in ddd]),
            "partitions": [{k: d.get(k) for k in ("partition", "of", "documents", "digest")} for d in ddd],
        },
        "source": _common([(r.get("settings") or {}).get("source") for r in records]),
    }


def _common(values: list):
    """The value all drafts share, or the list of them when they differ."""
    return values[0] if values and all(v == values[0] for v in values) else values


def _entry(root: Path, rel: str) -> dict:
    folder = root / rel
    record = read_record(folder)
    record.pop("hashes", None)
    (record.get("ddd") or {}).pop("hashes", None)
    if is_feature_draft(folder):
        return {
            "path": rel,
            "kind": "feature",
            "parameters": read_spec(folder).parameters(),
            "dtype": _safetensors_dtype(folder),
            "training": record,
        }
    return {
        "path": rel,
        "parameters": count_parameters(folder),
        "dtype": model_config(folder).get("dtype") or model_config(folder).get("torch_dtype"),
        "training": record,
    }


def _source_entry(source, folder: str | Path) -> dict:
    folder = Path(folder)
    cfg = model_config(folder)
    return {
        "source": source.as_dict(),
        "parameters": count_parameters(folder),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "training": read_record(folder),
    }


def _copy_model(src: str | Path, dst: Path, dtype: str | None) -> None:
    src = Path(src)
    if not (src / "model.safetensors").is_file():
        raise ModelFolderError(f"Model folder '{src}' has no model.safetensors.")
    dst.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    if dtype:
        _convert(dst, getattr(torch, dtype), dtype)


def _convert(folder: Path, dt: torch.dtype, name: str) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    if not (folder / "config.json").is_file():  # a feature draft: the dtype is its weights'
        return
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = name
    cfg.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _safetensors_dtype(folder: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        names = list(st.keys())
        return str(st.get_tensor(names[0]).dtype).replace("torch.", "") if names else None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import tokenizers
    import transformers

    try:
        epispec = version("epispec")
    except PackageNotFoundError:
        epispec = None
    return {
        "epispec": epispec,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
