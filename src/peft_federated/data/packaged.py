"""Files that installed packages ship (offline models and data), found without importing the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str | Path, what: str, install: str, reinstall: str | None = None) -> Path:
    """`relative` inside the installed `package` (its import name), located with `find_spec`, which does not
    run the package. ImportError naming `install` (or `reinstall`) when the package or the file is missing."""
    spec = importlib.util.find_spec(package)
    name = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{what} comes from the {name} package, which is not installed: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ImportError(f"{name} is installed but {path} is missing; reinstall it: {reinstall or install}")
    return path
