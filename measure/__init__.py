"""Measurement of epispec, kept out of the product: client harnesses and evaluations that use
`server` and `drafts` but that neither of them imports.

- `bench/`: `epispec bench`, EU serving against plain vLLM (speed, memory, EU error)
- `evaluation/`: `epispec eval`, EU estimation against a deep ensemble, hallucination
  detection, the bundle's flag threshold
- `load/`: `epispec load`, a loopback load test of a running server

Their plotting, progress-bar and process-memory libraries are the `measure` extra
(`pip install 'epispec[measure]'`); the server runs without them.
"""
