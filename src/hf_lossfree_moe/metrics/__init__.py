"""`evaluate` metric modules shipped with the package, loadable offline by path."""

from pathlib import Path


# `evaluate.load(MAXVIO_METRIC_PATH)`: MaxVio from per-expert loads, without the Hub.
MAXVIO_METRIC_PATH = str(Path(__file__).parent / "maxvio")

__all__ = ["MAXVIO_METRIC_PATH"]
