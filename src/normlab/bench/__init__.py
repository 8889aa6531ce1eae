"""Benchmarks: ``normlab bench kernels`` (norm kernels vs torch eager and torch.compile).

``app`` is the ``normlab bench`` Typer sub-app; each benchmark module adds its command."""

from normlab.bench import kernels  # noqa: F401  (registers its command)
from normlab.bench.common import app

__all__ = ["app"]
