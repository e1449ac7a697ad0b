"""SmolLM2 conversations run batched (`Engine.submit/step`) reply with the same greedy tokens as
the blocking calls run one session at a time (DESIGN.md contract 8: greedy tokens of the real model)."""

from __future__ import annotations

import pytest
import torch

from streamctx import Engine

CONVERSATIONS = {
    "paris": ["What is the capital of France?", "And of Italy?"],
    "haiku": ["Write a haiku about the sea."],
    "math": ["What is 12 plus 30? Answer with a number."],
    "list": ["Name three colors.", "Now three animals."],
}
POLICY = {"haiku": {"name": "sink_window", "sinks": 4, "window": 16, "slack": 4}}  # evicts within the reply
REPLY_TOKENS = 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load("smollm2", dtype=torch.float32, device="cpu", prefill_chunk=64)


def test_batched_conversations_reply_like_one_at_a_time(engine: Engine) -> None:
    tickets = {}
    for sid, turns in CONVERSATIONS.items():
        engine.session(sid, policy=POLICY.get(sid, "full"))
        tickets[sid] = [engine.submit(sid, text, role="user", generate=True, max_new_tokens=REPLY_TOKENS)
                        for text in turns]
    steps = 0
    while not engine.idle:
        engine.step()
        steps += 1
    batched = {sid: [t.generation.token_ids for t in ts] for sid, ts in tickets.items()}  # type: ignore[union-attr]
    for sid in CONVERSATIONS:
        engine.sessions[sid].close()
    # Batching happened: far fewer steps than the sessions' forwards one at a time.
    assert steps < sum(len(turns) for turns in CONVERSATIONS.values()) * REPLY_TOKENS
    for sid, turns in CONVERSATIONS.items():
        s = engine.session(sid, policy=POLICY.get(sid, "full"))
        alone = []
        for text in turns:
            s.chat("user", text)
            alone.append(s.chat_reply(max_new_tokens=REPLY_TOKENS).token_ids)
        s.close()
        assert batched[sid] == alone, sid
    assert engine.tokenizer.decode(batched["paris"][0]).lower().count("paris") >= 1
