from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _policy_tests_on_one_thread(one_torch_thread: None) -> None:
    """Every policy test works on tiny tensors: one torch thread (see tests/conftest.py)."""
