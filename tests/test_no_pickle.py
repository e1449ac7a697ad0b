"""No code path of the installed package can unpickle or evaluate: every source file of `streamctx`
(operators and schedulers included) is parsed and searched for the calls that would."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGES = ("streamctx", "streamctx.operators", "streamctx.schedulers")

# Modules whose loaders run arbitrary code on the bytes they read.
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
# Dotted call names refused anywhere (`np`/`numpy` loads are checked for allow_pickle below).
REFUSED_CALLS = {
    "torch.load", "torch.serialization.load", "yaml.unsafe_load", "yaml.full_load", "yaml.full_load_all",
    "yaml.unsafe_load_all", "pandas.read_pickle", "pd.read_pickle", "ray.cloudpickle.load", "ray.cloudpickle.loads",
}
REFUSED_BUILTINS = {"eval", "exec", "compile", "__import__"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}


def _sources() -> list[Path]:
    files: set[Path] = set()
    for name in PACKAGES:
        for folder in importlib.import_module(name).__path__:
            files.update(Path(folder).rglob("*.py"))
    return sorted(files)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every import of a pickling module and every call that could unpickle or evaluate, as 'line: what'."""
    hits = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            hits += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[0] in PICKLING_MODULES or mod == "ray.cloudpickle":
                hits.append(f"{node.lineno}: from {mod} import ...")
            if mod in ("torch", "yaml", "numpy") and any(a.name in ("load", "unsafe_load", "full_load") for a in node.names):
                hits.append(f"{node.lineno}: from {mod} import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func) or ""
            if name in REFUSED_BUILTINS or name in REFUSED_CALLS or name.split(".")[0] in PICKLING_MODULES:
                hits.append(f"{node.lineno}: {name}()")
            elif name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if _dotted(loader) not in SAFE_YAML_LOADERS if loader is not None else True:
                    hits.append(f"{node.lineno}: {name}() without SafeLoader")
            elif name in ("np.load", "numpy.load"):
                allow = _kw(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    hits.append(f"{node.lineno}: {name}(allow_pickle=...)")
    return hits


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = """
import pickle
from cloudpickle import loads
import torch, yaml, numpy as np
torch.load("m.pt")
yaml.load(text)
yaml.load(text, Loader=yaml.FullLoader)
np.load("a.npy", allow_pickle=True)
eval("1+1")
exec("x = 1")
pickle.loads(b"")
"""
    hits = unsafe_calls(bad)
    assert len(hits) == 9, hits
    good = """
import yaml, numpy as np, safetensors.torch
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
np.load("a.npy")
np.load("a.npy", allow_pickle=False)
safetensors.torch.load(data)
model.eval()
"""
    assert unsafe_calls(good) == []


def test_sources_are_found() -> None:
    files = _sources()
    names = {p.name for p in files}
    assert len(files) > 50 and {"spec.py", "state.py", "memory_budget.py", "gguf_file.py"} <= names


@pytest.mark.parametrize("path", _sources(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_unpickling_or_eval(path: Path) -> None:
    assert unsafe_calls(path.read_text(encoding="utf-8"), str(path)) == []
