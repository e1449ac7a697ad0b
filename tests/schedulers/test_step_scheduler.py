"""Step scheduler: budgets hold, nobody starves, priorities order, prefill is chunked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamctx.schedulers import Demand, Grant, StepScheduler


def _simulate(sched: StepScheduler, work: dict[str, list[int]], priority: dict[str, int],
              max_steps: int, *, split: bool = True) -> tuple[list[list[Grant]], dict[str, int]]:
    """Run sessions to completion. work[sid]: a list of prefill sizes (0 = one decode token) in order.

    Returns the grants per step and the step at which each session finished."""
    left = {sid: list(items) for sid, items in work.items() if items}
    done: dict[str, int] = {}
    history: list[list[Grant]] = []
    for step in range(max_steps):
        if not left:
            break
        demands = []
        for sid, items in left.items():
            head = items[0]
            demands.append(Demand(sid, prefill=head, decode=head == 0, priority=priority.get(sid, 0),
                                  split=split, state_bytes=10, bytes_per_token=1))
        grants = sched.step(demands)
        history.append(grants)
        assert grants, "a step with demands granted nothing"
        for g in grants:
            items = left[g.session_id]
            if g.kind == "decode":
                assert items[0] == 0
                items.pop(0)
            else:
                assert 1 <= g.tokens <= items[0]
                items[0] -= g.tokens
                if items[0] == 0:
                    items.pop(0)
            if not items:
                del left[g.session_id]
                done[g.session_id] = step
    assert not left, f"sessions never finished: {sorted(left)}"
    return history, done


work_st = st.dictionaries(st.sampled_from([f"s{i}" for i in range(12)]),
                          st.lists(st.one_of(st.just(0), st.integers(1, 700)), min_size=1, max_size=6),
                          min_size=1, max_size=12)


@given(work=work_st, budget=st.integers(1, 600), chunk=st.sampled_from([1, 7, 64, 256]),
       max_sessions=st.integers(1, 16), prio=st.lists(st.integers(0, 3), min_size=12, max_size=12))
def test_budgets_hold_and_everyone_finishes(work, budget, chunk, max_sessions, prio) -> None:
    sched = StepScheduler(budget, max_sessions=max_sessions, prefill_chunk=chunk, aging=2)
    priority = {f"s{i}": p for i, p in enumerate(prio)}
    total = sum(max(1, n) for items in work.values() for n in items)
    history, done = _simulate(sched, work, priority, max_steps=total + 1)
    for grants in history:
        assert len(grants) <= max_sessions
        assert len({g.session_id for g in grants}) == len(grants)
        assert sum(g.tokens for g in grants) <= budget
        assert all(g.tokens <= chunk for g in grants)


@given(work=work_st, budget=st.integers(1, 600), chunk=st.sampled_from([16, 64, 256]))
def test_atomic_prefill_runs_whole_chunks(work, budget, chunk) -> None:
    """split=False: every prefill grant is exactly min(left, chunk); a lone oversize chunk still runs."""
    sched = StepScheduler(budget, prefill_chunk=chunk)
    left = {sid: list(items) for sid, items in work.items()}
    total = sum(max(1, n) for items in work.values() for n in items)
    history, _ = _simulate(StepScheduler(budget, prefill_chunk=chunk), work, {}, total + 1, split=False)
    del sched
    for grants in history:
        over = sum(g.tokens for g in grants) > budget
        assert not over or len(grants) == 1, "an oversize atomic chunk must run alone"
        for g in grants:
            items = left[g.session_id]
            if g.kind == "decode":
                items.pop(0)
                continue
            assert g.tokens == min(items[0], chunk)
            items[0] -= g.tokens
            if items[0] == 0:
                items.pop(0)


@given(n=st.integers(2, 40), budget=st.integers(1, 8), aging=st.integers(1, 5),
       prio=st.lists(st.integers(0, 3), min_size=40, max_size=40))
def test_no_starvation_under_endless_decode(n, budget, aging, prio) -> None:
    """Endless decode demand from n sessions, budget < n: each runs within a bounded wait."""
    sched = StepScheduler(budget, aging=aging)
    sids = [f"s{i}" for i in range(n)]
    last = {sid: -1 for sid in sids}
    worst = 0
    for step in range(60 * n):
        grants = sched.step([Demand(sid, decode=True, priority=prio[i]) for i, sid in enumerate(sids)])
        assert len(grants) == min(budget, n)
        for g in grants:
            worst = max(worst, step - last[g.session_id])
            last[g.session_id] = step
    # A session's effective priority rises one level per `aging` steps waited; after at most
    # (max priority gap + 1) * aging steps it outranks everyone who just ran, and among equals
    # the longest-waiting go first, so the wait is bounded by that plus one round of n sessions.
    bound = (max(prio[:n]) - min(prio[:n]) + 1) * aging + n
    assert worst <= bound
    assert all(v >= 60 * n - bound for v in last.values())


def test_priority_orders_and_decode_before_prefill() -> None:
    sched = StepScheduler(3, aging=100)
    grants = sched.step([Demand("low", decode=True), Demand("high", decode=True, priority=2),
                         Demand("mid", prefill=5, priority=1), Demand("dec", decode=True, priority=1)])
    assert [g.session_id for g in grants] == ["high", "dec", "mid"]
    assert grants[2] == Grant("mid", 1, "prefill")  # split prefill takes what is left of the budget


def test_prefill_chunking_splits_long_input() -> None:
    sched = StepScheduler(1000, prefill_chunk=256)
    sizes = []
    left = 700
    while left:
        (g,) = sched.step([Demand("doc", prefill=left)])
        sizes.append(g.tokens)
        left -= g.tokens
    assert sizes == [256, 256, 188]


def test_memory_budget_holds_and_oversize_runs_alone() -> None:
    sched = StepScheduler(100, memory_budget=1000)
    demands = [Demand(f"s{i}", decode=True, state_bytes=300, bytes_per_token=10) for i in range(5)]
    grants = sched.step(demands)
    assert len(grants) == 3  # 3 * 310 <= 1000 < 4 * 310
    big = StepScheduler(100, memory_budget=1000)
    (g,) = big.step([Demand("huge", decode=True, state_bytes=5000)])
    assert g.session_id == "huge"


def test_round_robin_and_continuous_join_leave() -> None:
    sched = StepScheduler(2)
    seen = [tuple(g.session_id for g in sched.step([Demand(s, decode=True) for s in "abc"])) for _ in range(3)]
    assert seen == [("a", "b"), ("c", "a"), ("b", "c")]
    # "d" joins, "a" leaves; the newcomer runs in its first steps, the others continue in turn.
    nxt = [g.session_id for g in sched.step([Demand(s, decode=True) for s in "bcd"])]
    assert "d" in nxt or sched.waited("d") == 1
    assert sched.waited("a") == 0  # forgotten once it has no demand


@pytest.mark.parametrize("bad", [dict(prefill=0), dict(prefill=3, decode=True), dict(prefill=-1),
                                 dict(decode=True, state_bytes=-1)])
def test_bad_demands_fail_clearly(bad) -> None:
    with pytest.raises(ValueError, match="Demand"):
        Demand("s", **bad)


def test_bad_config_and_duplicates() -> None:
    with pytest.raises(ValueError, match="token_budget"):
        StepScheduler(0)
    with pytest.raises(ValueError, match="one demand per session"):
        StepScheduler(4).step([Demand("a", decode=True), Demand("a", prefill=2)])
