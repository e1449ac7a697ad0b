from __future__ import annotations

from streamctx.schedulers.placement import LRU, Entry, Lookahead, PolicyContext, Priority, SizeAware


def _ids(entries):
    return [e.session_id for e in entries]


ENTRIES = [
    Entry("a", nbytes=100, last_used=5, priority=0),
    Entry("b", nbytes=1000, last_used=3, priority=1),
    Entry("c", nbytes=10, last_used=1, priority=0),
    Entry("d", nbytes=500, last_used=9, priority=2),
]


def test_lru() -> None:
    assert _ids(LRU().eviction_order(ENTRIES, PolicyContext(now=10))) == ["c", "b", "a", "d"]


def test_size_aware_prefers_big_idle_state() -> None:
    # age x bytes: a 6*100=600, b 8*1000=8000, c 10*10=100, d 2*500=1000
    assert _ids(SizeAware().eviction_order(ENTRIES, PolicyContext(now=10))) == ["b", "d", "a", "c"]


def test_priority_then_tiebreak() -> None:
    assert _ids(Priority(LRU()).eviction_order(ENTRIES, PolicyContext(now=10))) == ["c", "a", "b", "d"]


def test_lookahead_keeps_queued_sessions_nearest_last() -> None:
    ctx = PolicyContext(upcoming={"a": 0, "c": 4}, now=10)
    assert _ids(Lookahead(LRU()).eviction_order(ENTRIES, ctx)) == ["b", "d", "c", "a"]
    assert _ids(Lookahead(Priority()).eviction_order(ENTRIES, ctx)) == ["b", "d", "c", "a"]
