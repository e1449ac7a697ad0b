"""The operators the decoders are built on, imported in one place."""

from __future__ import annotations

from streamctx.operators.attn import attention
from streamctx.operators.ssm import selective_scan

__all__ = ["attention", "selective_scan"]
