"""``python -m normlab`` and the ``normlab`` console script.

The command line (Typer, rich, the studies' plots and checkpoints) comes with the
``study`` extra; a core install (torch only) gets one line saying so, not a traceback.
"""

from __future__ import annotations

import sys

# the top-level packages of the ``study`` extra (pyproject.toml)
STUDY_EXTRA = frozenset({"typer", "rich", "matplotlib", "safetensors", "numpy"})
MISSING_EXTRA = "normlab's command line needs the study extra: pip install 'normlab[study]'"


def main() -> None:
    """Run the ``normlab`` command line, or exit 1 with one line if the study extra is missing
    (130, with no traceback, on Ctrl-C while torch and the command line are imported)."""
    try:
        from normlab.cli import app
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in STUDY_EXTRA:
            raise
        print(f"{MISSING_EXTRA} (missing: {e.name})", file=sys.stderr)
        sys.exit(1)
    app()


if __name__ == "__main__":
    main()
