"""`make lint` refuses an import that points up the layers or closes a circle (.importlinter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emp_tasks.store.db import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages and contracts to break on purpose."""
    for package in ("emp_tasks", "web"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_tree_keeps_every_contract(tree: Path):
    result = lint(tree)
    assert result.returncode == 0, result.stdout[-2000:]


def test_core_importing_a_domain_module_breaks_the_layers(tree: Path):
    with (tree / "emp_tasks" / "core" / "ids.py").open("a") as module:
        module.write("\nfrom emp_tasks.steps import client  # noqa\n")
    result = lint(tree)
    assert result.returncode != 0
    assert "emp_tasks.core.ids -> emp_tasks.steps.client" in result.stdout


def test_an_import_inside_a_function_that_closes_a_circle_is_refused(tree: Path):
    with (tree / "emp_tasks" / "steps" / "transitions.py").open("a") as module:
        module.write("\n\ndef _late():\n    from emp_tasks.steps import attempts  # noqa\n")
    result = lint(tree)
    assert result.returncode != 0
    assert "emp_tasks.steps.transitions -> emp_tasks.steps.attempts" in result.stdout
