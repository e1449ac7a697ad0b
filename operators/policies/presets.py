"""Named presets: a concrete policy and sizes for a speed/quality trade-off.

speed:    StreamingLLM with a 512-token cache (smallest, fastest decode).
balanced: retrieval with the 1K-token budget of the benchmark (4 sinks + 508 recent + 8 x 64 fetched).
quality:  retrieval with a 2K-token budget (4 sinks + 1020 recent + 16 x 64 fetched).
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "speed": {"name": "sink_window", "sinks": 4, "window": 508},
    "balanced": {"name": "retrieval", "sinks": 4, "window": 508, "topk": 8, "block": 64},
    "quality": {"name": "retrieval", "sinks": 4, "window": 1020, "topk": 16, "block": 64},
}
