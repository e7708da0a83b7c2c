"""Where `epispec`'s time goes: cProfile of both of its processes during the timed levels.

`epispec bench --configs epispec --profile DIR` runs the epispec config with
- the runner's own process (for epispec: VllmEngine.generate, the joiner's records, the bias
  of every token) under cProfile for the timed levels: DIR/CONFIG-api.{prof,txt,json}
- the proposer swapped for `ProfiledProposer`, a subclass of the engine's proposer that
  times every `propose` call and profiles it: DIR/proposer.prof, DIR/proposer.txt and
  DIR/proposer.json ({calls, propose_s, rows}) — `propose_s` over a level's wall time is the
  share of the engine core's step spent drafting

The proposer runs in vLLM's worker process, which inherits the environment; the output folder
reaches it through EPISPEC_BENCH_PROFILE_DIR (a bench-only hook, not a server setting).
cProfile slows Python-heavy code: read the profiles as a ranking of costs, and take the
throughput figures from a run without --profile.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

PROFILE_DIR_ENV = "EPISPEC_BENCH_PROFILE_DIR"
PROPOSER = "measure.bench.profile.ProfiledProposer"
DUMP_EVERY_S = 0.5


def summary(prof: cProfile.Profile, n: int = 30) -> str:
    """The top `n` functions by own time and by cumulative time."""
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(n)
    return out.getvalue()


def save(prof: cProfile.Profile, folder: Path, name: str, extra: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(str(folder / f"{name}.prof"))
    (folder / f"{name}.txt").write_text(summary(prof))
    if extra is not None:
        (folder / f"{name}.json").write_text(json.dumps(extra))


def _proposer_base():
    from server.engine.vllm_proposer import EnsembleProposer

    return EnsembleProposer


class ProfiledProposer(_proposer_base()):
    """The engine's proposer, timed and profiled call by call. vLLM gives a proposer no
    shutdown hook, so it dumps at its first call DUMP_EVERY_S after the previous dump (the
    runner sends one short request after the timed levels to trigger the last one)."""

    def __init__(self, vllm_config) -> None:
        super().__init__(vllm_config)
        self._folder = Path(os.environ[PROFILE_DIR_ENV])
        self._prof = cProfile.Profile()
        self._stats = {"calls": 0, "propose_s": 0.0, "rows": 0}
        self._last_dump = time.perf_counter()

    def propose(self, *args, **kwargs):
        t0 = time.perf_counter()
        self._prof.enable()
        try:
            return super().propose(*args, **kwargs)
        finally:
            self._prof.disable()
            t1 = time.perf_counter()
            self._stats["calls"] += 1
            self._stats["propose_s"] += t1 - t0
            self._stats["rows"] += len(args[0]) if args else 0
            if t1 - self._last_dump > DUMP_EVERY_S:
                save(self._prof, self._folder, "proposer", self._stats)
                self._last_dump = t1
