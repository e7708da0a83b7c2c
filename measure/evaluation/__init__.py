"""Evaluation of epispec's uncertainty (`epispec eval`): is the drafts' EU the ensemble's EU, and
does it detect hallucinated calculator results? See `pipeline.py` for the flow."""
