"""Check the layer contract of pyproject.toml ([tool.importlinter]) on the installed layout.

Why a wrapper around `lint-imports`: `cli/`, `preprocessing/` and `export/` live at the top
of the repository but install as `mtcmkd.cli`, `mtcmkd.preprocessing` and `mtcmkd.export`
(`package-dir` in pyproject.toml), and import-linter's graph builder (grimp) only walks the
folder of the root package, so it would not see them. This script mirrors the installed
layout in a temporary folder (symlinks to the sources, read from `package-dir` and `packages`,
so nothing is copied or duplicated) and runs `lint-imports` there against the repository's
pyproject.toml. A listed package without an `__init__.py` (a namespace package) gets an empty
one in the mirror, since grimp does not descend into such folders inside a regular package.

It also refuses a package folder that `packages` does not list (an install would leave it out).

Usage: `python .ci/lint_imports.py` (from any folder; `make lint` runs it). Exit status 0 when
every contract is kept and every package is listed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, a dependency of import-linter there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _setuptools(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]


def unlisted_packages(root: Path = ROOT) -> list[str]:
    """Folders with an `__init__.py` under the package roots that `packages` does not list.

    A non-editable install leaves such a package out, and the mirror would hide it from the
    contract, so `make lint` refuses them.
    """
    root = root.resolve()
    setup = _setuptools(root)
    listed = set(setup["packages"])
    found = []
    for name, folder in setup.get("package-dir", {}).items():
        for init in sorted((root / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(root / folder).parts
            dotted = ".".join((name, *parts))
            if dotted not in listed:
                found.append(dotted)
    return found


def mirror_installed_layout(root: Path, dest: Path) -> Path:
    """Build under `dest` the package tree that `pip install` makes of `root`; returns `dest`.

    Folders are real (so a test can add a module to the mirror without touching the sources);
    every `.py` file is a symlink to its source.
    """
    root = root.resolve()  # the symlinks must not depend on the working folder
    setup = _setuptools(root)
    package_dir: dict[str, str] = setup.get("package-dir", {})
    for package in setup["packages"]:
        # The source folder of a package: its own package-dir entry, else its parent's + name.
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in package_dir:
                source = root / package_dir[prefix] / Path(*parts[cut:])
                break
        else:
            source = root / Path(*parts)
        target = dest / Path(*parts)
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(source.glob("*.py")):
            link = target / file.name
            if not link.exists():
                link.symlink_to(file)
        if not (target / "__init__.py").exists():
            (target / "__init__.py").write_text("")
    return dest


def lint_imports(root: Path = ROOT, mirror: Path | None = None,
                 capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `lint-imports` on the mirror of `root` (built in a temporary folder when None)."""
    exe = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="mtcmkd-layers-") as tmp:
        if mirror is None:
            mirror = mirror_installed_layout(root, Path(tmp))
        config = mirror / "pyproject.toml"
        if not config.exists():
            config.symlink_to(root.resolve() / "pyproject.toml")
        # Run in the mirror: lint-imports reads ./pyproject.toml and puts the working folder
        # first on sys.path, so `mtcmkd` resolves to the mirror, not to the editable install.
        env = dict(os.environ, PYTHONPATH=str(mirror))
        return subprocess.run([str(exe), "--no-cache", "--no-logo"], cwd=mirror, env=env, text=True,
                              capture_output=capture)


def main() -> int:
    missing = unlisted_packages()
    for name in missing:
        print(f"pyproject.toml: package {name} is not in [tool.setuptools] packages "
              "(an install would leave it out); add it", file=sys.stderr)
    return lint_imports().returncode or int(bool(missing))


if __name__ == "__main__":
    sys.exit(main())
