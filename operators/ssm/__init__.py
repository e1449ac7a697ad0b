"""Selective state-space scan (Mamba S6): chunked fast path; `naive.selective_scan` is the loop reference."""

from streamctx.operators.ssm.scan import DEFAULT_CHUNK, DEFAULT_DECAY_BUDGET, selective_scan

__all__ = ["selective_scan", "DEFAULT_CHUNK", "DEFAULT_DECAY_BUDGET"]
