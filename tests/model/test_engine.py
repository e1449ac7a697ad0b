"""Engine/Session API on tiny models of both families: state round trips, generation, chat, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamctx import Engine
from streamctx.engine import EngineError
from streamctx.model.config import ModelLoadError
from streamctx.operators.policies import UnknownPolicyError
from streamctx.state import StateBlob
from tests.fixtures.tiny_models import make_tiny_llama, make_tiny_mamba

VOCAB = 181


@pytest.fixture(scope="module", params=["llama", "mamba"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        folder = make_tiny_llama(root / "m", hidden=32, heads=4, kv_heads=2, layers=2, vocab_size=VOCAB, tie=False)
    else:
        folder = make_tiny_mamba(root / "m", hidden=32, layers=2, vocab_size=VOCAB)
    return Engine.load(folder, block_size=8, prefill_chunk=16)


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_session_identity_and_close_frees_state(engine: Engine) -> None:
    s = engine.session("conv-42")
    assert engine.session("conv-42") is s
    s.feed(ids(21))
    assert engine.stats()["live_sessions"] == 1 and engine.stats()["state_bytes"] > 0
    s.close()
    st = engine.stats()
    assert st["live_sessions"] == 0 and st["state_bytes"] == 0 and st["kv_bytes"] == 0
    assert engine.session("conv-42") is not s
    engine.session("conv-42").close()


def test_restored_session_continues_bit_identically(engine: Engine) -> None:
    s = engine.session("orig")
    s.feed(ids(19, 1))
    blob = s.save()
    r = engine.session("copy", state=blob)
    nxt = ids(7, 2)
    a = s.feed(nxt, return_logits=True).logits
    b = r.feed(nxt, return_logits=True).logits
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # same bits
    ga, gb = s.generate(6), r.generate(6)
    assert ga.token_ids == gb.token_ids
    assert StateBlob.from_bytes(s.save()).equal(StateBlob.from_bytes(r.save()))
    s.close(), r.close()


def test_restore_into_a_fresh_engine_uses_its_own_blocks(engine: Engine, tmp_path: Path) -> None:
    s = engine.session("a")
    s.feed(ids(30, 3))
    blob = s.save()
    other = engine.session("filler")
    other.feed(ids(9, 4))  # restored blocks will not start at block 0
    r = engine.session("b", state=blob)
    x = ids(5, 5)
    assert torch.equal(s.feed(x, return_logits=True).logits, r.feed(x, return_logits=True).logits)
    for t in (s, r, other):
        t.close()


def test_generation_greedy_matches_argmax_feed_loop(engine: Engine) -> None:
    prompt = ids(11, 6)
    s = engine.session("gen")
    s.feed(prompt)
    g = s.generate(8)
    manual = engine.session("manual")
    logits = manual.feed(prompt, return_logits=True).logits[-1]
    expected = []
    for _ in range(8):
        t = int(torch.argmax(logits))
        if t in engine.tokenizer.eos_token_ids:
            break
        expected.append(t)
        logits = manual.feed([t], return_logits=True).logits[-1]
    assert g.token_ids == expected
    assert g.finish_reason == ("length" if len(expected) == 8 else "eos")
    assert s.n_tokens == len(prompt) + len(expected)  # the last sampled token is pending, not lost
    s.close(), manual.close()


def test_seeded_sampling_is_reproducible_and_top_k1_is_greedy(engine: Engine) -> None:
    runs = []
    for name in ("x", "y"):
        s = engine.session(name)
        s.feed(ids(9, 7))
        runs.append(s.generate(10, temperature=1.3, top_p=0.9, seed=123).token_ids)
    assert runs[0] == runs[1]
    greedy = engine.session("g")
    greedy.feed(ids(9, 7))
    topk1 = engine.session("k")
    topk1.feed(ids(9, 7))
    assert topk1.generate(6, temperature=0.7, top_k=1, seed=5).token_ids == greedy.generate(6).token_ids
    for name in ("x", "y", "g", "k"):
        engine.session(name).close()


def test_stop_string_cuts_text(engine: Engine) -> None:
    s = engine.session("stop")
    s.feed(ids(5, 8))
    full = s.generate(12)
    s.close()
    assert len(full.text) >= 4, "the fixed seed gives a long enough continuation"
    stop = full.text[2:4]
    s = engine.session("stop")
    s.feed(ids(5, 8))
    g = s.generate(12, stop=stop)
    assert g.finish_reason == "stop" and g.text == full.text[: full.text.find(stop)]
    s.close()


def test_feed_text_equals_feed_ids_and_chat_feeds_the_template(engine: Engine) -> None:
    text = "Streams of text flow through sessions."
    a, b = engine.session("t1"), engine.session("t2")
    tok = engine.tokenizer.encode(text)
    if max(tok) >= VOCAB:
        tok = [t % VOCAB for t in tok]
        with pytest.raises(EngineError, match="out of the vocabulary"):
            a.feed(text)
        a.feed(tok)
    else:  # pragma: no cover - vocab is always smaller here
        a.feed(text)
    b.feed(tok)
    assert torch.equal(a.last_logits, b.last_logits)
    a.close(), b.close()


def test_bad_inputs_raise_clear_errors(engine: Engine) -> None:
    s = engine.session("bad")
    with pytest.raises(EngineError, match="empty"):
        s.feed("")
    with pytest.raises(EngineError, match="empty"):
        s.feed([])
    with pytest.raises(EngineError, match=f"token id {VOCAB} is out of the vocabulary"):
        s.feed([1, VOCAB])
    with pytest.raises(EngineError, match="out of the vocabulary"):
        s.feed([-1])
    with pytest.raises(EngineError, match="no context"):
        s.generate(3)
    with pytest.raises(EngineError, match="top_p"):
        s.generate(3, temperature=1.0, top_p=0.0)
    with pytest.raises(EngineError, match="not a streamctx state blob|too short|header"):
        engine.session("junk", state=b"not a state blob at all")
    other = StateBlob("other.session", {"x": torch.zeros(1)}).to_bytes()
    with pytest.raises(EngineError, match="kind"):
        engine.session("junk", state=other)
    s.feed([5, 6])
    with pytest.raises(EngineError, match="is live"):
        engine.session("bad", state=s.save())
    s.close()
    with pytest.raises(EngineError, match="closed"):
        s.feed([1])


def test_unknown_policy_is_a_clear_error(engine: Engine, tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "p", hidden=16, heads=2, kv_heads=1, layers=1, vocab_size=VOCAB)
    with pytest.raises(UnknownPolicyError, match="unknown policy 'nope'"):
        Engine.load(folder, policy="nope")
    with pytest.raises(UnknownPolicyError, match="name"):
        Engine.load(folder, policy={"window": 3})
    assert Engine.load(folder, policy={"name": "full"}).session("x").policy.name == "full"


def test_perplexity_matches_logits(engine: Engine) -> None:
    x = ids(40, 9)
    s = engine.session("ppl")
    logits = s.feed(x, return_logits=True).logits
    s.close()
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), x[1:], reduction="mean")
    assert engine.perplexity(x.tolist(), chunk_size=7) == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert engine.stats()["live_sessions"] == 0


def test_bad_model_files_raise_model_load_error(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "m", hidden=16, heads=2, kv_heads=1, layers=1, vocab_size=VOCAB)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] + 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="intermediate|gate_proj|up_proj|down_proj"):
        Engine.load(folder)
    cfg["intermediate_size"] -= 1
    (folder / "config.json").write_text(json.dumps(cfg))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="safetensors"):
        Engine.load(folder)
