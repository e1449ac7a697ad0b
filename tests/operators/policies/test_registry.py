"""Policies by name, preset and dict; parameter errors; config round trips."""

from __future__ import annotations

import pytest

from streamctx.operators.policies import (
    POLICIES, PRESETS, CachePolicy, FullPolicy, RetrievalPolicy, SinkWindowPolicy, UnknownPolicyError, make_policy,
)

BOUNDED = sorted(set(POLICIES) - {"full"})


def test_every_policy_builds_by_name_with_defaults_and_follows_the_protocol() -> None:
    assert set(POLICIES) == {"full", "sink_window", "heavy_hitter", "snapkv", "hierarchical", "compressive",
                             "retrieval"}
    for name in POLICIES:
        p = make_policy(name)
        assert isinstance(p, CachePolicy) and p.name == name
        assert p.bounded == (name != "full")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_config_round_trips(name: str) -> None:
    p = make_policy(name)
    cfg = p.config()
    assert cfg["name"] == name
    assert not any(k.startswith("_") for k in cfg)
    assert make_policy(cfg).config() == cfg


def test_presets_map_to_concrete_policies_and_accept_overrides() -> None:
    assert set(PRESETS) == {"speed", "balanced", "quality"}
    speed = make_policy("speed")
    assert isinstance(speed, SinkWindowPolicy) and (speed.sinks, speed.window) == (4, 508)
    quality = make_policy("quality")
    assert isinstance(quality, RetrievalPolicy) and quality.topk * quality.block == 1024
    custom = make_policy({"name": "balanced", "topk": 4})
    assert isinstance(custom, RetrievalPolicy) and custom.topk == 4 and custom.window == 508


def test_dict_parameters_reach_the_policy() -> None:
    p = make_policy({"name": "sink_window", "sinks": 2, "window": 30})
    assert isinstance(p, SinkWindowPolicy) and p.capacity == 32 and p.attended_cap(8) == 32 + 64 + 8
    assert make_policy(p) is p
    assert isinstance(make_policy({"name": "full"}), FullPolicy)


@pytest.mark.parametrize("spec, match", [
    ("lru", "unknown policy 'lru'"),
    ({"window": 3}, "needs a 'name'"),
    ({"name": "sink_window", "windw": 3}, "bad parameters for policy 'sink_window'"),
    ({"name": "sink_window", "window": 0}, "window must be a positive integer"),
    ({"name": "retrieval", "block": 64, "slack": 8}, "slack"),
    ({"name": "snapkv", "observe_window": 64, "window": 32}, "observe_window"),
    ({"name": "hierarchical", "factor": 1}, "factor"),
    ({"name": "compressive", "rule": "hebbian"}, "rule"),
    ({"name": "retrieval", "_host": {}}, "private"),
    (3, "must be a name, a dict or a CachePolicy"),
])
def test_bad_specs_are_clear_errors(spec: object, match: str) -> None:
    with pytest.raises(UnknownPolicyError, match=match):
        make_policy(spec)  # type: ignore[arg-type]


def test_each_session_gets_its_own_policy_state() -> None:
    a, b = make_policy("retrieval"), make_policy("retrieval")
    assert a is not b and a.host_nbytes() == b.host_nbytes() == 0
