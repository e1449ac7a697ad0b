"""The adaptive-window hook on a real session (tiny random Llama): decisions reach the cache."""

from __future__ import annotations

import pytest
import torch

from streamctx import Engine
from streamctx.engine import Session
from streamctx.operators.policies import SinkWindowPolicy
from streamctx.schedulers.adaptive_policy import AdaptiveWindowController
from streamctx.schedulers.windows import WindowConfig
from tests.fixtures.tiny_models import make_tiny_llama
from tests.schedulers.corpus import repetitive_log, sotu_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SINKS, SLACK = 4, 16


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder = make_tiny_llama(tmp_path_factory.mktemp("aw") / "tiny", hidden=32, heads=2, kv_heads=1,
                             head_dim=16, layers=2, seed=3)
    return Engine.load(folder, block_size=8, prefill_chunk=64)


def _segments(engine: Engine) -> list[tuple[str, list[int]]]:
    """Prose and log segments of ~40 tokens, in runs of six."""
    prose = sotu_text(6000)
    logs = repetitive_log(120, seed=1)
    out: list[tuple[str, list[int]]] = []
    for run in range(4):
        src = prose if run % 2 == 0 else logs
        for i in range(6):
            text = src[(run * 6 + i) * 180:(run * 6 + i + 1) * 180]
            out.append((text, engine.tokenizer.encode(text)))
    return out


def _config(lo: int, hi: int, **kw: int) -> WindowConfig:
    return WindowConfig(min_window=lo, max_window=hi, bytes_per_token=1, budget_bytes=hi, quantum=8, **kw)


def _logprobs(prev: torch.Tensor | None, logits: torch.Tensor, ids: list[int]) -> list[float]:
    if prev is not None:
        logits, targets = torch.cat([prev[None], logits]), torch.tensor(ids)
    else:
        targets = torch.tensor(ids[1:])
    lp = torch.log_softmax(logits[: targets.shape[0]].float(), -1).gather(1, targets[:, None])[:, 0]
    return lp.double().tolist()


def _run(engine: Engine, segs: list[tuple[str, list[int]]], policy: SinkWindowPolicy,
         ctl_config: WindowConfig | None) -> tuple[list[torch.Tensor], list[int], list[int], Session]:
    s = Session(engine, "aw", policy=policy)
    ctl = None
    if ctl_config is not None:
        ctl = AdaptiveWindowController(policy, ctl_config, apply=lambda: engine.model.apply_policy(s.state, policy))
    outs, windows, lengths = [], [], []
    for text, ids in segs:
        prev = s.last_logits
        logits = s.feed(ids, return_logits=True).logits
        outs.append(logits)
        if ctl is not None:
            ctl.after_segment(text, _logprobs(prev, logits, ids))
        windows.append(policy.sinks + policy.window)
        lengths.append(max(s.state.length(li) for li in range(engine.config.num_layers)))
    return outs, windows, lengths, s


def test_fixed_bounds_equal_the_plain_sink_window(engine: Engine) -> None:
    segs = _segments(engine)
    fixed, _, _, s1 = _run(engine, segs, SinkWindowPolicy(sinks=SINKS, window=60, slack=SLACK), None)
    pinned, windows, _, s2 = _run(engine, segs, SinkWindowPolicy(sinks=SINKS, window=200, slack=SLACK),
                                  _config(64, 64))
    s1.close(), s2.close()
    assert set(windows) == {64}
    for a, b in zip(fixed, pinned):
        assert torch.equal(a, b)


def test_decisions_reach_the_cache_and_follow_content(engine: Engine) -> None:
    segs = _segments(engine)
    policy = SinkWindowPolicy(sinks=SINKS, window=100, slack=SLACK)
    _, windows, lengths, s = _run(engine, segs, policy, _config(24, 160, shrink_patience=2))
    s.close()
    # After each segment (and the immediate eviction of a shrink) no layer holds more than the
    # window just decided plus the policy's slack.
    for w, n in zip(windows, lengths):
        assert n <= w + SLACK, (windows, lengths)
    prose_w = [w for i, w in enumerate(windows) if (i // 6) % 2 == 0]
    log_w = [w for i, w in enumerate(windows) if (i // 6) % 2 == 1]
    assert min(windows) < max(windows)
    assert sum(log_w) / len(log_w) < sum(prose_w) / len(prose_w), windows


def test_session_restores_with_its_current_window(engine: Engine) -> None:
    segs = _segments(engine)[:9]
    policy = SinkWindowPolicy(sinks=SINKS, window=100, slack=SLACK)
    _, windows, _, s = _run(engine, segs, policy, _config(24, 160, shrink_patience=1))
    data = s.save()
    s.close()
    restored = engine.session("aw-restored", state=data)
    try:
        assert isinstance(restored.policy, SinkWindowPolicy)
        assert restored.policy.sinks + restored.policy.window == windows[-1]
    finally:
        restored.close()


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="sinks"):
        AdaptiveWindowController(object(), _config(24, 64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_window"):
        AdaptiveWindowController(SinkWindowPolicy(sinks=32, window=64), _config(24, 64))


def test_mean_window_is_token_weighted() -> None:
    policy = SinkWindowPolicy(sinks=SINKS, window=60)
    ctl = AdaptiveWindowController(policy, _config(16, 64, shrink_patience=1, ema=1.0, band=0.0))
    first = ctl.window
    ctl.after_segment("x " * 10, [-0.1] * 30)
    second = ctl.window
    ctl.after_segment("y " * 10, [-0.1] * 10)
    assert ctl.mean_window() == pytest.approx((first * 30 + second * 10) / 40)

