"""Engines: the uncertainty math, speculative decoding, the reference and vLLM engines."""
