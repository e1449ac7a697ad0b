"""The package layout promised in DESIGN.md: operators/ and schedulers/ install inside streamctx."""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"streamctx": "streamctx", "streamctx.operators": "operators", "streamctx.schedulers": "schedulers"}


def _declared_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def _on_disk_packages() -> set[str]:
    found: set[str] = set()
    for pkg, folder in MAPPED.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((pkg, *rel)) if rel else pkg)
    return found


def test_every_package_folder_is_declared() -> None:
    missing = _on_disk_packages() - set(_declared_packages())
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_operators_and_schedulers_live_in_the_streamctx_namespace() -> None:
    ops = importlib.import_module("streamctx.operators")
    sch = importlib.import_module("streamctx.schedulers")
    assert Path(ops.__file__).parent == ROOT / "operators"
    assert Path(sch.__file__).parent == ROOT / "schedulers"
    assert "operators" not in sys.modules or not hasattr(sys.modules["operators"], "attention")
    assert all(p.startswith("streamctx") for p in _declared_packages())
