"""The ppkit command-line interface (Typer)."""
