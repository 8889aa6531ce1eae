"""The core install is torch only: ``import normlab`` and its library parts work without
the ``study`` extra, and the command line says in one line what to install.

Each check runs in a fresh interpreter whose ``sys.meta_path`` makes the study extra's
packages (typer, rich, matplotlib, safetensors, numpy) look uninstalled. numpy is
blocked too: torch imports it only when it is there (``torch/storage.py`` catches
ModuleNotFoundError) and runs without it, warning "Failed to initialize NumPy".
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY_EXTRA = ("typer", "rich", "matplotlib", "safetensors", "numpy")

# a finder that makes the study extra look uninstalled (raised the way a missing
# package is: ModuleNotFoundError with .name, which is what torch and normlab catch)
BLOCK_STUDY_EXTRA = textwrap.dedent(
    f"""
    import sys, warnings
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    BLOCKED = {set(STUDY_EXTRA)!r}

    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Missing())
    """
)


def run_without_study_extra(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", BLOCK_STUDY_EXTRA + textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )


def test_core_works_without_study_extra():
    result = run_without_study_extra(
        """
        import torch
        import normlab
        from normlab import functional as F

        torch.manual_seed(0)
        x = torch.randn(3, 5, 8)
        for ours, theirs in ((normlab.LayerNorm(8), torch.nn.LayerNorm(8)),
                             (normlab.RMSNorm(8, eps=1e-6), torch.nn.RMSNorm(8, eps=1e-6))):
            with torch.no_grad():
                theirs.weight.normal_()
            ours.load_state_dict(theirs.state_dict())
            torch.testing.assert_close(ours(x), theirs(x))
        ln = torch.nn.LayerNorm(8)
        torch.testing.assert_close(F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-5), ln(x))

        import normlab.convert
        import normlab.diagnostics
        import normlab.models
        from normlab.models import TransformerConfig, TransformerLM

        cfg = TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=2, norm="rmsnorm")
        lm = TransformerLM(cfg)
        tokens = torch.randint(0, 32, (2, 6))
        logits = lm(tokens)
        assert logits.shape == (2, 6, 32), logits.shape
        logits.sum().backward()

        # checkpoints need safetensors: a one-line ImportError that names the extra
        try:
            normlab.models.save_model(lm, "unused.safetensors")
        except ImportError as e:
            assert "normlab[study]" in str(e) and "\\n" not in str(e), str(e)
        else:
            raise AssertionError("save_model ran without safetensors")

        loaded = sorted({m.partition(".")[0] for m in sys.modules} & BLOCKED)
        assert not loaded, loaded
        print("core ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "core ok" in result.stdout


@pytest.mark.parametrize(
    "entry",
    [
        "from normlab.__main__ import main; main()",  # the console script's target
        "import runpy; runpy.run_module('normlab', run_name='__main__')",  # python -m normlab
    ],
    ids=["console-script", "python-m"],
)
def test_cli_without_study_extra_says_what_to_install(entry):
    result = run_without_study_extra(f"sys.argv = ['normlab', '--help']\n{entry}\n")
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "normlab[study]" in lines[0]
    assert result.stdout == ""


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip()


def test_core_dependencies_are_torch_only():
    project = _pyproject()["project"]
    assert [_name(r) for r in project["dependencies"]] == ["torch"]
    extras = project["optional-dependencies"]
    assert sorted(_name(r) for r in extras["study"]) == sorted(STUDY_EXTRA)
    # `pip install -e .[dev]` (make test) gets the study and cluster extras too
    dev = extras["dev"]
    own = {e.strip() for r in dev if _name(r) == "normlab" for e in r.split("[")[1].rstrip("]").split(",")}
    assert {"study", "cluster"} <= own, dev
    assert {"triton", "hf", "cluster"} <= set(extras)
    assert [_name(r) for r in extras["cluster"]] == ["submitit"]
    assert project["scripts"]["normlab"] == "normlab.__main__:main"


def test_ctrl_c_while_the_command_line_imports_exits_130_without_a_traceback():
    # a Ctrl-C that lands while torch and the command line are imported (seconds on a
    # cold start): one line and 130, as a Ctrl-C in a study, not a traceback
    code = textwrap.dedent(
        """
        import sys

        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "normlab.cli":
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["normlab", "--help"]
        from normlab.__main__ import main
        main()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.strip() == "interrupted", result.stderr
