"""Adaptive attention window: complexity score -> window size in [min, max] under a memory budget.

Timing: surprisal exists only after the model has processed a segment, so the decision made after
segment i sets how many tokens of context are retained going into segment i + 1 (the window for
the next segment). Before any segment has been seen the window is `initial_window` (default: max).

Anti-flapping: the score is smoothed (EMA); the window grows as soon as the smoothed score has
risen by at least `band` since the last change (complex content should not wait), and shrinks
only after `shrink_patience` consecutive decisions that all want a smaller window and have fallen
by at least `band` (grow fast, shrink slow). Alternating easy/hard segments therefore settle on
the larger window instead of oscillating.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from .complexity import ComplexityScore

if TYPE_CHECKING:
    from .complexity import ComplexityAnalyzer


@dataclass(frozen=True)
class WindowConfig:
    """Bounds and budget of one session's window.

    min_window/max_window: tokens. bytes_per_token: KV bytes per retained token (e.g. SmolLM2 bf16:
    30 layers x 2 (K, V) x 3 heads x 64 dims x 2 bytes = 23,040). budget_bytes: the session's KV
    budget; the effective maximum is min(max_window, budget_bytes // bytes_per_token).
    quantum: windows are multiples of it (the KV block size), except where a bound is not.
    """

    min_window: int
    max_window: int
    bytes_per_token: int
    budget_bytes: int
    quantum: int = 64
    ema: float = 0.5
    band: float = 0.1
    shrink_patience: int = 3
    initial_window: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"WindowConfig.{name}={getattr(self, name)!r}: {why}")

        if self.min_window < 1:
            bad("min_window", "must be >= 1")
        if self.max_window < self.min_window:
            bad("max_window", f"must be >= min_window ({self.min_window})")
        if self.bytes_per_token < 1:
            bad("bytes_per_token", "must be >= 1")
        if self.budget_bytes < self.min_window * self.bytes_per_token:
            bad("budget_bytes", f"cannot hold min_window={self.min_window} tokens "
                f"({self.min_window * self.bytes_per_token} bytes at {self.bytes_per_token} bytes/token)")
        if self.quantum < 1:
            bad("quantum", "must be >= 1")
        if not 0.0 < self.ema <= 1.0:
            bad("ema", "must be in (0, 1]")
        if not 0.0 <= self.band < 1.0:
            bad("band", "must be in [0, 1)")
        if self.shrink_patience < 1:
            bad("shrink_patience", "must be >= 1")
        if self.initial_window is not None and not self.min_window <= self.initial_window <= self.max_window:
            bad("initial_window", f"must be within [{self.min_window}, {self.max_window}]")

    @property
    def cap(self) -> int:
        """Largest window the bounds and the budget allow."""
        return min(self.max_window, self.budget_bytes // self.bytes_per_token)


@dataclass(frozen=True)
class WindowDecision:
    """One decision, kept for the output stats."""

    segment_index: int
    components: dict[str, float | None]
    score: float
    smoothed: float
    target_window: int
    window: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WindowScheduler:
    """Maps each processed segment's complexity to the window kept for the next segment."""

    config: WindowConfig
    decisions: list[WindowDecision] = field(default_factory=list)

    def __post_init__(self) -> None:
        cfg = self.config
        self._window = min(cfg.cap, cfg.initial_window if cfg.initial_window is not None else cfg.max_window)
        self._smoothed: float | None = None
        self._ref: float | None = None  # smoothed score at the last change
        self._shrink_votes = 0

    @property
    def window(self) -> int:
        """Current window (tokens retained going into the next segment)."""
        return self._window

    def target_for(self, score: float) -> int:
        """Window a score asks for, before hysteresis: linear in [min, cap], rounded to the quantum."""
        cfg = self.config
        lo, hi = cfg.min_window, cfg.cap
        raw = lo + min(1.0, max(0.0, score)) * (hi - lo)
        q = cfg.quantum
        rounded = int(round(raw / q)) * q
        return min(hi, max(lo, rounded))

    def decide(self, score: ComplexityScore | float, segment_index: int | None = None) -> WindowDecision:
        """Record the decision after a segment was processed; returns it (also appended to `decisions`)."""
        cfg = self.config
        value = score.score if isinstance(score, ComplexityScore) else float(score)
        components = score.components() if isinstance(score, ComplexityScore) else {}
        idx = len(self.decisions) if segment_index is None else segment_index

        self._smoothed = value if self._smoothed is None else cfg.ema * value + (1 - cfg.ema) * self._smoothed
        s = self._smoothed
        target = self.target_for(s)
        current = self._window

        if self._ref is None:
            self._ref = s
            self._window, reason = target, "first decision"
            self._shrink_votes = 0
        elif target > current and s - self._ref >= cfg.band:
            self._window, self._ref, reason = target, s, f"grow: smoothed score rose {s - self._ref:+.3f}"
            self._shrink_votes = 0
        elif target < current and self._ref - s >= cfg.band:
            self._shrink_votes += 1
            if self._shrink_votes >= cfg.shrink_patience:
                self._window, reason = target, f"shrink after {self._shrink_votes} low segments"
                self._ref, self._shrink_votes = s, 0
            else:
                reason = f"hold: shrink vote {self._shrink_votes}/{cfg.shrink_patience}"
        else:
            self._shrink_votes = 0
            reason = "hold: within hysteresis band" if target != current else "hold: at target"

        decision = WindowDecision(idx, components, value, s, target, self._window, reason)
        self.decisions.append(decision)
        return decision

    def stats(self) -> dict[str, Any]:
        windows = [d.window for d in self.decisions]
        changes = sum(1 for a, b in zip(windows, windows[1:]) if a != b)
        return {
            "decisions": len(self.decisions),
            "window_changes": changes,
            "mean_window": sum(windows) / len(windows) if windows else float(self._window),
            "min_window_used": min(windows) if windows else self._window,
            "max_window_used": max(windows) if windows else self._window,
        }


class AdaptiveWindow:
    """One session's analyzer and window scheduler together: what the engine calls per segment.

    After the model has processed segment i (so its token log-probs exist):
    ``decision = aw.after_segment(text, token_logprobs)``; keep ``decision.window`` tokens of
    context going into segment i + 1. ``aw.decisions`` are the records for the output stats.
    """

    def __init__(self, config: WindowConfig, analyzer: ComplexityAnalyzer | None = None) -> None:
        from .complexity import ComplexityAnalyzer

        self.analyzer = analyzer if analyzer is not None else ComplexityAnalyzer()
        self.scheduler = WindowScheduler(config)
        self._index = 0

    @property
    def window(self) -> int:
        return self.scheduler.window

    @property
    def decisions(self) -> list[WindowDecision]:
        return self.scheduler.decisions

    def after_segment(self, text: str, token_logprobs: Sequence[float] | None = None) -> WindowDecision:
        score = self.analyzer.score(text, token_logprobs=token_logprobs)
        decision = self.scheduler.decide(score, segment_index=self._index)
        self._index += 1
        return decision
