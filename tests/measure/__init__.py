"""Tests of the measurement package (bench, evaluation, load)."""
