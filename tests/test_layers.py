"""The layer contract of pyproject.toml ([tool.importlinter]) holds, and it catches what it should.

`make lint` runs the same check (.ci/lint_imports.py); running it here too means the suite
fails on an import that breaks the layers of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lint_imports", ROOT / ".ci" / "lint_imports.py")
assert _spec is not None and _spec.loader is not None
lint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint)


@pytest.fixture(scope="module", autouse=True)
def _lint_imports_installed() -> None:
    if shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' (import-linter)")


def test_the_layer_contract_is_kept() -> None:
    result = lint.lint_imports(capture=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_every_package_is_listed_for_install() -> None:
    """A package missing from [tool.setuptools] packages is left out of a wheel."""
    assert lint.unlisted_packages() == []


def test_the_mirror_holds_the_installed_layout(tmp_path: Path) -> None:
    mirror = lint.mirror_installed_layout(ROOT, tmp_path)
    assert (mirror / "mtcmkd" / "cli" / "main.py").resolve() == ROOT / "cli" / "main.py"
    assert (mirror / "mtcmkd" / "export" / "__init__.py").is_file()
    assert (mirror / "mtcmkd" / "preprocessing" / "__init__.py").is_file()
    # a namespace package gets an empty __init__.py, or grimp would not descend into it
    assert all((mirror / "mtcmkd" / name / "__init__.py").is_file()
               for name in ("engine", "phantom", "methods"))


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path: Path) -> None:
    mirror = lint.mirror_installed_layout(ROOT, tmp_path)
    (mirror / "mtcmkd" / "metrics" / "layer_probe.py").write_text(
        "def f():\n    from mtcmkd.cli import main\n    return main\n")
    result = lint.lint_imports(mirror=mirror, capture=True)
    assert result.returncode == 1, result.stdout
    assert "mtcmkd.metrics is not allowed to import mtcmkd.cli" in result.stdout
    assert "mtcmkd.metrics.layer_probe -> mtcmkd.cli" in result.stdout


def test_siblings_of_one_layer_are_independent(tmp_path: Path) -> None:
    mirror = lint.mirror_installed_layout(ROOT, tmp_path)
    (mirror / "mtcmkd" / "phantom" / "layer_probe.py").write_text(
        "import mtcmkd.preprocessing.driver\n")
    result = lint.lint_imports(mirror=mirror, capture=True)
    assert result.returncode == 1, result.stdout
    assert "mtcmkd.phantom is not allowed to import mtcmkd.preprocessing" in result.stdout


def test_a_module_outside_every_layer_breaks_the_contract(tmp_path: Path) -> None:
    mirror = lint.mirror_installed_layout(ROOT, tmp_path)
    (mirror / "mtcmkd" / "utils2.py").write_text("")
    result = lint.lint_imports(mirror=mirror, capture=True)
    assert result.returncode == 1, result.stdout
    assert "mtcmkd.utils2" in result.stdout
