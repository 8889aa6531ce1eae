"""What a conversion did, module by module: the report every transform returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Entry:
    """One module's outcome: ``action`` is what was done ("swapped", "fused", "folded",
    "converted", "centered") or "left" (nothing done; ``detail`` says why)."""

    path: str
    kind: str
    action: str
    detail: str = ""


@dataclass
class ConversionReport:
    """The outcome of one transform on one model (the model is changed in place)."""

    transform: str
    model: nn.Module
    entries: list[Entry] = field(default_factory=list)

    def add(self, path: str, module: object, action: str, detail: str = "") -> None:
        kind = module if isinstance(module, str) else type(module).__name__
        self.entries.append(Entry(path or "<root>", kind, action, detail))

    def attach(self) -> nn.Module:
        """Keep this report on the model as ``model.normlab_report``; return the model."""
        self.model.normlab_report = self
        return self.model

    def paths(self, action: str) -> list[str]:
        """Module paths with this action, in model order."""
        return [e.path for e in self.entries if e.action == action]

    @property
    def left(self) -> dict[str, str]:
        """Path -> reason, for every module the transform considered and left unchanged."""
        return {e.path: e.detail for e in self.entries if e.action == "left"}

    @property
    def changed(self) -> list[Entry]:
        return [e for e in self.entries if e.action != "left"]

    def to_dict(self) -> dict:
        return {
            "transform": self.transform,
            "entries": [e.__dict__.copy() for e in self.entries],
        }

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.action] = counts.get(e.action, 0) + 1
        head = f"{self.transform}: " + (
            ", ".join(f"{n} {a}" for a, n in counts.items()) if counts else "nothing to do"
        )
        width = max((len(e.path) for e in self.entries), default=0)
        lines = [head] + [
            f"  {e.action:<9} {e.path:<{width}}  {e.kind}" + (f": {e.detail}" if e.detail else "")
            for e in self.entries
        ]
        return "\n".join(lines)


class ConversionError(ValueError):
    """A transform that cannot be applied exactly to this model; the message says why.
    The model is left unchanged."""
