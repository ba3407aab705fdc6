"""No project module may be named like a standard-library module or an installed distribution's top-level module.

A Prefect worker imports a deployment's entrypoint with the entrypoint's folder (flows/) first on sys.path, and
`python -m benchmarks.x` or pytest put other folders there: a flows/profile.py then replaced the standard library's
`profile` for everything imported after it (torch._dynamo imports cProfile, which imports profile).
"""
from __future__ import annotations

import importlib.metadata
import pkgutil
import site
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("dna", "flows", "benchmarks", "tests")
OWN_PACKAGES = {"dna", "flows"}  # the project's own distribution installs these two


def project_module_names() -> dict[str, list[str]]:
    """Every module and package name under FOLDERS (as it would be imported with its folder on sys.path), with
    the files that carry it."""
    names: dict[str, list[str]] = {}
    for folder in FOLDERS:
        top = ROOT / folder
        for path in sorted(top.rglob("*")):
            if "__pycache__" in path.parts:
                continue
            if path.is_file() and path.suffix == ".py" and not path.stem.startswith("__"):
                name = path.stem
            elif path.is_dir() and any(path.glob("*.py")):
                name = path.name
            else:
                continue
            names.setdefault(name, []).append(str(path.relative_to(ROOT)))
        names.setdefault(folder, []).append(folder)
    return names


def installed_top_level_names() -> set[str]:
    """Top-level modules and packages of every installed distribution, by metadata and by what site-packages holds."""
    folders = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    found = {module.name for module in pkgutil.iter_modules(sorted(f for f in folders if Path(f).is_dir()))}
    return found | set(importlib.metadata.packages_distributions())


def test_the_name_lists_are_not_empty():
    names = project_module_names()
    assert {"pipeline", "steps", "config", "test_module_names"} <= names.keys()
    assert {"json", "profile", "logging"} <= set(sys.stdlib_module_names)
    assert {"torch", "timm", "prefect", "mlflow", "dvc", "yaml"} <= installed_top_level_names()


def test_no_project_module_shadows_the_standard_library_or_an_installed_package():
    taken = set(sys.stdlib_module_names) | installed_top_level_names()
    clashes = {name: paths for name, paths in project_module_names().items()
               if name in taken and name not in OWN_PACKAGES}
    assert not clashes, ("project modules named like a standard-library or installed module (rename them): "
                         + "; ".join(f"{name}: {', '.join(paths)}" for name, paths in sorted(clashes.items())))
