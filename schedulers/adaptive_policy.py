"""Applies adaptive-window decisions to a session's KV policy, segment by segment.

The window scheduler (`windows.py`) decides, after segment i has been processed, how many tokens
of context to retain going into segment i + 1. This module is the hook that makes the decision
real: it sets the `window` of the session's sink+window policy (StreamingLLM, `sink_window`), so the
cache keeps `sinks + window` tokens from then on. No new policy type is needed and the session's
saved state stays restorable: the policy's config (saved with the session) carries the current
window.

    policy = SinkWindowPolicy(sinks=4, window=1020)
    session = Session(engine, "s1", policy=policy)   # or engine.session(...) with that policy
    ctl = AdaptiveWindowController(policy, WindowConfig(...), apply=lambda: model.apply_policy(...))
    for seg in segments:
        logprobs = ...feed seg, log-probs of its tokens...
        ctl.after_segment(seg.text, logprobs)        # window for the next segment

`apply` (optional) evicts at once after a shrink; without it the cache shrinks after the next
forward call (the policy is consulted after each one), so the first chunk of the next segment
still sees the old window.

Schedulers never import the model: the policy is anything with integer `sinks` and `window`
attributes (duck-typed), and `apply` is a callable the caller binds.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from .complexity import ComplexityAnalyzer
from .windows import AdaptiveWindow, WindowConfig, WindowDecision


class WindowedPolicy(Protocol):
    """A KV policy that keeps `sinks` first tokens plus the last `window` tokens."""

    sinks: int
    window: int


class AdaptiveWindowController:
    """One session's adaptive window, applied to its sink+window policy.

    Windows in `WindowConfig` count every retained token (sinks included); the policy's `window`
    is the recent part, `retained - sinks` (at least 1).
    """

    def __init__(self, policy: WindowedPolicy, config: WindowConfig, analyzer: ComplexityAnalyzer | None = None,
                 *, apply: Callable[[], None] | None = None) -> None:
        if not isinstance(getattr(policy, "window", None), int) or not isinstance(getattr(policy, "sinks", None), int):
            raise TypeError(f"AdaptiveWindowController needs a policy with integer 'sinks' and 'window', "
                            f"got {type(policy).__name__}")
        if config.min_window <= policy.sinks:
            raise ValueError(f"WindowConfig.min_window={config.min_window} must exceed the policy's "
                             f"sinks={policy.sinks} (the window counts sinks too)")
        self.policy = policy
        self.adaptive = AdaptiveWindow(config, analyzer)
        self._apply = apply
        self._tokens_at: list[tuple[int, int]] = []  # (retained window, tokens processed under it)
        self._set(self.adaptive.window)

    @property
    def window(self) -> int:
        """Tokens retained (sinks + recent) going into the next segment."""
        return self.adaptive.window

    @property
    def decisions(self) -> list[WindowDecision]:
        return self.adaptive.decisions

    def _set(self, retained: int) -> None:
        new = max(1, retained - self.policy.sinks)
        shrink = new < self.policy.window
        self.policy.window = new
        if shrink and self._apply is not None:
            self._apply()

    def after_segment(self, text: str, token_logprobs: Sequence[float] | None = None,
                      n_tokens: int | None = None) -> WindowDecision:
        """Score the segment just processed and set the window for the next one.

        n_tokens: the segment's tokens (default: len(token_logprobs)); weights `mean_window`.
        """
        n = n_tokens if n_tokens is not None else (len(token_logprobs) if token_logprobs is not None else 0)
        self._tokens_at.append((self.window, n))
        decision = self.adaptive.after_segment(text, token_logprobs)
        self._set(decision.window)
        return decision

    def mean_window(self) -> float:
        """Token-weighted mean retained window over the segments processed so far (the fixed
        window with the same mean KV bytes)."""
        total = sum(n for _, n in self._tokens_at)
        if total == 0:
            return float(self.window)
        return sum(w * n for w, n in self._tokens_at) / total

    def stats(self) -> dict[str, Any]:
        return {**self.adaptive.scheduler.stats(), "token_weighted_mean_window": self.mean_window()}
