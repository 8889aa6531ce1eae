"""Benchmarks: ``normlab bench kernels`` (norm kernels vs torch eager and torch.compile)
and ``normlab bench e2e`` (a TransformerLM's training step and inference forward).

``app`` is the ``normlab bench`` Typer sub-app; each benchmark module adds its command."""

from normlab.bench import e2e, kernels  # noqa: F401  (each registers its command)
from normlab.bench.common import app

__all__ = ["app"]
