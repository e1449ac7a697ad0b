"""Attention, state-space and memory operators: pure functions of (input, state).

Operators know nothing of sessions, Ray or config files. Each fast path has a plain
reference with the same signature in `streamctx.operators.naive`.
"""
