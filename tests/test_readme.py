"""The README's promises: CI runs its test command verbatim, and its solver table is the registry."""
import re
from pathlib import Path

import pytest

from diffsampler import SOLVERS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_install_and_run_then_install_and_test():
    sample_cmd, test_cmd = readme_commands()[:2]
    assert sample_cmd.startswith("pip install") and "diffsampler sample" in sample_cmd
    assert test_cmd.startswith("pip install") and "pytest" in test_cmd


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_solver_table_matches_the_registry():
    for name, cls in SOLVERS.items():
        row = next((line for line in README.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"solver {name} missing from the README table"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == str(cls().order) and cells[3] == cls.nfe_rule(), row
        assert cells[4].startswith(cls.default_schedule), row


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_runs_as_written(index, tmp_path, monkeypatch):
    """Each Python block of the README runs as written; a block that needs what cannot exist
    offline (a user's diffusers pipeline, ComfyUI) says so in its first line, ``# needs: ...``."""
    block = python_blocks()[index]
    if block.startswith("# needs:"):
        pytest.skip(block.splitlines()[0])
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
