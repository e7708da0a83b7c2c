"""Subcommands of the `epispec` CLI, one module each (add_arguments + run)."""
