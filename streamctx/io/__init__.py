"""Sources and sinks of streaming jobs.

Sources yield `RawRecord`s with replay offsets (`open_source(spec, start_offset=...)` resumes
exactly after a recorded offset); sinks commit files atomically (temp file + rename).
"""

from __future__ import annotations

from streamctx.io.sinks import CallbackSink, FileSink, MemorySink, Sink, open_sink
from streamctx.io.sources import RawRecord, Source, open_source

__all__ = ["CallbackSink", "FileSink", "MemorySink", "RawRecord", "Sink", "Source", "open_sink", "open_source"]
