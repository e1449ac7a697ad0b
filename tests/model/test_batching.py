"""Batched multi-session execution (`Engine.submit/step`) equals running the sessions one at a time.

Tiny random models: logits within fp32 tolerance (batching changes reduction order), over random
mixes of prompt lengths, policies and arrival orders. Greedy tokens on SmolLM2 live in
test_batching_smollm2.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import streamctx.model.llama as llama
from streamctx import Engine
from streamctx.engine import EngineError, Ticket
from tests.fixtures.tiny_models import make_tiny_llama, make_tiny_mamba
from tests.tolerances import assert_close

VOCAB = 173
BLOCK = 4
CHUNK = 16
LOGIT_SCALE = 10.0  # fp32 tolerance x 10: max abs diff <= 1e-4 (+ rtol), the bound

POLICIES: dict[str, Any] = {
    "full": "full",
    "sink_window": {"name": "sink_window", "sinks": 2, "window": 10, "slack": 2},
    "heavy_hitter": {"name": "heavy_hitter", "heavy": 6, "recent": 6, "slack": 2},
    "snapkv": {"name": "snapkv", "selected": 6, "window": 6, "observe_window": 3, "slack": 2},
    "retrieval": {"name": "retrieval", "sinks": 2, "window": 8, "topk": 1, "block": 4, "q_group": 4, "slack": 3},
    "compressive": {"name": "compressive", "sinks": 2, "window": 10, "slack": 2},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("batch") / "m", hidden=36, heads=6, kv_heads=2, head_dim=6,
                           layers=2, vocab_size=VOCAB, tie=False)


@pytest.fixture(scope="module")
def engines(folder: Path) -> tuple[Engine, Engine]:
    """(batched, one-at-a-time) engines on the same weights; sessions are closed by each test."""
    return (Engine.load(folder, block_size=BLOCK, prefill_chunk=CHUNK),
            Engine.load(folder, block_size=BLOCK, prefill_chunk=CHUNK))


def _script(seed: int, prompt_len: int, decode_steps: int) -> list[list[int]]:
    """One session's requests: a prompt, then single-token feeds (each one a decode step)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (prompt_len,), generator=g).tolist()
    return [prompt] + [[int(t)] for t in torch.randint(3, VOCAB, (decode_steps,), generator=g)]


def _one_at_a_time(engine: Engine, scripts: dict[str, list[list[int]]], policies: dict[str, Any]
                   ) -> dict[str, list[torch.Tensor]]:
    out = {}
    for sid, requests in scripts.items():
        s = engine.session(sid, policy=policies[sid])
        out[sid] = [s.feed(ids, return_logits=True).logits for ids in requests]
        s.close()
    return out


def _batched(engine: Engine, scripts: dict[str, list[list[int]]], policies: dict[str, Any],
             order: list[str]) -> dict[str, list[torch.Tensor]]:
    """Submit the requests interleaved in `order` (a session's own requests stay in order)."""
    for sid in scripts:
        engine.session(sid, policy=policies[sid])
    tickets: dict[str, list[Ticket]] = {sid: [] for sid in scripts}
    nxt = {sid: 0 for sid in scripts}
    for sid in order:
        if nxt[sid] < len(scripts[sid]):
            tickets[sid].append(engine.submit(sid, scripts[sid][nxt[sid]], return_logits=True))
            nxt[sid] += 1
            engine.step()  # arrivals interleave with steps: sessions join mid-flight
    for sid, requests in scripts.items():
        for ids in requests[nxt[sid]:]:
            tickets[sid].append(engine.submit(sid, ids, return_logits=True))
    engine.run_until_idle()
    out = {}
    for sid, ts in tickets.items():
        assert all(t.done and t.error is None for t in ts), [t.error for t in ts]
        out[sid] = [t.feed.logits for t in ts]  # type: ignore[union-attr]
        engine.sessions[sid].close()
    return out


@settings(max_examples=15)
@given(data=st.data())
def test_batched_logits_equal_one_at_a_time(engines: tuple[Engine, Engine], data: st.DataObject) -> None:
    batched, single = engines
    n = data.draw(st.integers(2, 6), label="sessions")
    lens = data.draw(st.lists(st.sampled_from([1, 2, 3, 5, 7, 13, 17, 31, 40]), min_size=n, max_size=n), label="lens")
    steps = data.draw(st.integers(1, 14), label="decode steps")
    names = data.draw(st.lists(st.sampled_from(sorted(POLICIES)), min_size=n, max_size=n), label="policies")
    scripts = {f"s{i}": _script(1000 * i + lens[i], lens[i], steps) for i in range(n)}
    policies = {f"s{i}": POLICIES[names[i]] for i in range(n)}
    order = data.draw(st.permutations([sid for sid in scripts for _ in range(steps + 1)]), label="arrivals")
    want = _one_at_a_time(single, scripts, policies)
    got = _batched(batched, scripts, policies, order)
    for sid in scripts:
        for i, (g, w) in enumerate(zip(got[sid], want[sid])):
            assert_close(g, w, scale=LOGIT_SCALE, msg=f"{sid} ({names[int(sid[1:])]}) request {i}")
    assert batched.stats()["blocks_used"] == 0 and batched.idle


def test_decode_steps_really_batch(engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    """With every session decoding, a step is one forward over all of them (the decode group)."""
    batched, _ = engines
    calls: list[int] = []
    real = batched.model.forward

    def spy(batch: Any, **kw: Any) -> Any:
        calls.append(len(batch))
        return real(batch, **kw)

    monkeypatch.setattr(batched.model, "forward", spy)
    tickets = [batched.submit(f"d{i}", list(range(3, 3 + 5 + i)), generate=True, max_new_tokens=6)
               for i in range(5)]
    batched.run_until_idle()
    assert all(len(t.generation.token_ids) + (t.generation.finish_reason == "eos") >= 1 for t in tickets)  # type: ignore[union-attr]
    # 5 prefills (one atomic chunk each) fit one step's budget; then 5 decode steps of 5 sessions
    assert calls[0] == 5 and max(calls) == 5 and len(calls) <= 1 + 5
    for i in range(5):
        batched.sessions[f"d{i}"].close()


def test_decode_group_keeps_tables_contiguous(engines: tuple[Engine, Engine]) -> None:
    """Interleaved decoding would fragment block tables; the decode group keeps each a single run."""
    batched, single = engines
    prompts = {f"c{i}": list(range(3, 3 + BLOCK * (i + 1))) for i in range(3)}  # block-aligned: every token crosses
    tickets = [batched.submit(sid, ids, generate=True, max_new_tokens=3 * BLOCK + 1) for sid, ids in prompts.items()]
    batched.run_until_idle()
    for sid, t in zip(prompts, tickets):
        s = batched.sessions[sid]
        assert all(layer.contiguous for layer in s.state.layers)
        ref = single.session(sid)
        ref.feed(prompts[sid])
        assert ref.generate(3 * BLOCK + 1).token_ids == t.generation.token_ids  # type: ignore[union-attr]
        ref.close()
        s.close()


def test_blocking_calls_are_unchanged_and_refuse_interleaving(engines: tuple[Engine, Engine]) -> None:
    batched, _ = engines
    t = batched.submit("busy", [5, 6, 7], generate=True, max_new_tokens=2)
    with pytest.raises(EngineError, match="in flight"):
        batched.sessions["busy"].feed([8])
    with pytest.raises(EngineError, match="in flight"):
        batched.sessions["busy"].save()
    g = t.result()  # drives the engine until done
    assert t.done and g is t.generation and len(g.token_ids) <= 2  # type: ignore[union-attr]
    assert t.ttft is not None and t.ttft >= 0
    batched.sessions["busy"].feed([8])  # idle again: blocking calls work
    batched.sessions["busy"].close()


def test_chat_requests_match_blocking_chat(tmp_path: Path) -> None:
    """role= runs chat() (+ chat_reply() with generate=True): same tokens and history as the blocking calls."""
    folder = make_tiny_llama(tmp_path / "chat", hidden=24, heads=4, kv_heads=2, layers=1, tokenizer="bytes")
    eng = Engine.load(folder, block_size=BLOCK, prefill_chunk=CHUNK)
    ref = Engine.load(folder, block_size=BLOCK, prefill_chunk=CHUNK)
    turns = {"a": ["hi there", "and again"], "b": ["a longer question about many things"], "c": ["x"]}
    tickets = {sid: [eng.submit(sid, text, role="user", generate=True, max_new_tokens=4) for text in texts]
               for sid, texts in turns.items()}
    eng.run_until_idle()
    for sid, texts in turns.items():
        s = ref.session(sid)
        for text, t in zip(texts, tickets[sid]):
            s.chat("user", text)
            assert s.chat_reply(max_new_tokens=4).token_ids == t.generation.token_ids  # type: ignore[union-attr]
        assert eng.sessions[sid].messages == s.messages
        assert eng.sessions[sid].n_tokens == s.n_tokens
    eng.sessions["a"].close()


def test_request_errors_end_only_their_ticket(engines: tuple[Engine, Engine]) -> None:
    batched, _ = engines
    with pytest.raises(EngineError, match="out of the vocabulary"):
        batched.submit("e", [VOCAB + 5])
    with pytest.raises(EngineError, match="top_p"):
        batched.submit("e", [3], generate=True, top_p=0.0)
    with pytest.raises(EngineError, match="needs text_or_ids"):
        batched.submit("e")
    bad = batched.submit("e", generate=True, max_new_tokens=2)  # nothing fed yet: fails when it runs
    good = batched.submit("f", [3, 4, 5], generate=True, max_new_tokens=2)
    done = batched.run_until_idle()
    assert bad in done and good in done
    assert isinstance(bad.error, EngineError) and "no context" in str(bad.error)
    assert good.error is None and good.generation is not None
    with pytest.raises(EngineError, match="no context"):
        bad.result()
    queued = batched.submit("f", [6], generate=True)
    batched.sessions["f"].close()
    assert queued.done and "closed" in str(queued.error)
    batched.sessions["e"].close()


def test_priorities_run_first(engines: tuple[Engine, Engine]) -> None:
    """With one session per step, the higher priority request finishes first."""
    _, single = engines
    eng = Engine(single.model, single.tokenizer, prefill_chunk=CHUNK, max_batch=1)
    low = eng.submit("low", [3, 4], generate=True, max_new_tokens=3)
    high = eng.submit("high", [5, 6], generate=True, max_new_tokens=3, priority=5)
    order = [t for _ in range(20) for t in eng.step()]
    assert order.index(high) < order.index(low)
    for s in list(eng.sessions.values()):
        s.close()


def test_mamba_sessions_batch(tmp_path: Path) -> None:
    folder = make_tiny_mamba(tmp_path / "mamba", vocab_size=VOCAB)
    eng, ref = Engine.load(folder, prefill_chunk=CHUNK), Engine.load(folder, prefill_chunk=CHUNK)
    scripts = {f"m{i}": _script(i, 3 + 7 * i, 5) for i in range(3)}
    policies = {sid: None for sid in scripts}
    want = _one_at_a_time(ref, scripts, policies)
    got = _batched(eng, scripts, policies, [sid for sid in scripts for _ in range(6)])
    for sid in scripts:
        for g, w in zip(got[sid], want[sid]):
            assert_close(g, w, scale=LOGIT_SCALE)


def test_decode_group_is_used_for_plain_policies(engines: tuple[Engine, Engine],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-group sessions take the batched RoPE/append path (one cache write per layer)."""
    batched, _ = engines
    writes: list[int] = []
    real = llama.append_one_each

    def spy(caches: Any, *args: Any) -> None:
        writes.append(len(caches))
        real(caches, *args)

    monkeypatch.setattr(llama, "append_one_each", spy)
    for i in range(4):
        batched.submit(f"g{i}", [3, 4, 5, 6], generate=True, max_new_tokens=3)
    batched.run_until_idle()
    layers = batched.config.num_layers
    assert writes and all(w == 4 for w in writes) and len(writes) % layers == 0
    for i in range(4):
        batched.sessions[f"g{i}"].close()
