"""streamctx: a streaming dataflow engine for long-context LLM work.

`Engine` and `Session` are the library entry points; they are imported lazily so that
`import streamctx.operators` stays light (no model code, no Ray).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from streamctx.engine import Engine, Session

__all__ = ["Engine", "Session", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Engine", "Session"):
        from streamctx import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'streamctx' has no attribute {name!r}")
