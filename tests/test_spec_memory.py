"""`scheduler.memory`: budgets as byte sizes, and the peer tier's options (`peer_budget`,
`peer_stores`) with every wrong combination reported against its field."""

from __future__ import annotations

from typing import Any

import pytest

from streamctx.spec import JobSpec, validate


def _memory(tmp_path: Any, memory: dict[str, Any]) -> dict[str, str]:
    spec = {"name": "m", "source": {"type": "iterator", "obj": []}, "scheduler": {"memory": memory}}
    return {e.field: e.message for e in validate(spec, base_dir=str(tmp_path))}


def test_peer_tier_options_parse_as_byte_sizes(tmp_path) -> None:
    spec = JobSpec.from_dict({"name": "m", "source": {"type": "iterator", "obj": []}, "scheduler": {"memory": {
        "device_budget": "1MiB", "host_budget": "4MiB", "peer_budget": "1GiB", "peer_stores": 3}}}, base_dir=tmp_path)
    mem = spec.scheduler.memory
    assert (mem.device_budget, mem.host_budget, mem.peer_budget, mem.peer_stores) == (1 << 20, 4 << 20, 1 << 30, 3)
    # Off by default: no peer tier, and the model stage gets no peer options.
    default = JobSpec.from_dict({"name": "m", "source": {"type": "iterator", "obj": []}}).scheduler.memory
    assert default.peer_budget is None and default.peer_stores is None


@pytest.mark.parametrize("memory, message", [
    ({"peer_stores": 2}, "peer_stores needs peer_budget"),
    ({"device_budget": "1MiB", "peer_budget": "8MiB"}, "peer_budget needs device_budget and host_budget"),
    ({"peer_budget": "8MiB", "host_budget": "1MiB"}, "peer_budget needs device_budget and host_budget"),
    ({"device_budget": 1, "host_budget": 1, "peer_budget": 2, "peer_stores": 3}, "less than one byte per store"),
    ({"device_budget": 1, "host_budget": 1, "peer_budget": 0}, "less than one byte per store"),
])
def test_peer_tier_misconfigurations_name_the_section(tmp_path, memory: dict[str, Any], message: str) -> None:
    errors = _memory(tmp_path, memory)
    assert message in errors["scheduler.memory"], errors


@pytest.mark.parametrize("field, value, message", [
    ("peer_stores", 0, "greater than or equal to 1"),
    ("peer_stores", 5000, "less than or equal to 1024"),
    ("peer_budget", "lots", "byte"),
    ("peer_stores", "2", "valid integer"),
])
def test_peer_tier_field_errors_name_the_field(tmp_path, field: str, value: Any, message: str) -> None:
    errors = _memory(tmp_path, {"device_budget": "1MiB", "host_budget": "1MiB", "peer_budget": "8MiB", field: value})
    assert message in errors[f"scheduler.memory.{field}"], errors
