"""The paged KV cache: a shared block pool and per-session block tables (DESIGN.md contract 5)."""

from streamctx.kv.cache import LayerTable, SessionKV
from streamctx.kv.pool import BlockPool

__all__ = ["BlockPool", "LayerTable", "SessionKV"]
