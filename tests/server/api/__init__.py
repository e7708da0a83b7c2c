"""Tests; the layout mirrors the packages."""
