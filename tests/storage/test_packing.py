from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx.state import StateBlob, StateFormatError
from streamctx.storage import pack_blob, unpack_blob
from streamctx.storage.packing import pack_views, unpack_parts

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]


@given(
    shapes=st.lists(st.lists(st.sampled_from([0, 1, 2, 3, 7, 13]), max_size=4), max_size=5),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=5, max_size=5),
    transpose=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_roundtrip_is_bit_exact(shapes, dtypes, transpose, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        t = (torch.randn(shape, generator=g) * 100).to(dt)
        if transpose and t.dim() >= 2:
            t = t.transpose(0, 1)  # non-contiguous input
        tensors[f"t{i}"] = t
    blob = StateBlob("x", tensors, {"n": len(tensors), "nested": {"a": [1, 2]}})
    header, buf = pack_blob(blob)
    assert buf.nbytes == blob.nbytes()
    back = unpack_blob(header, buf)
    assert back.equal(blob)
    assert all(t.is_contiguous() for t in back.tensors.values())
    header2, parts = pack_views(blob)
    parts = [p.copy() for p in parts]  # as they come back from the object store
    assert header2 == header and unpack_parts(header2, parts).equal(blob)


def test_nan_payloads_and_negative_zero_survive() -> None:
    t = torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float32)
    blob = StateBlob("x", {"t": t})
    assert unpack_blob(*pack_blob(blob)).equal(blob)


def test_bad_header_is_a_clear_error() -> None:
    header, buf = pack_blob(StateBlob("x", {"t": torch.ones(4)}))
    with pytest.raises(StateFormatError, match="not a packed"):
        unpack_blob({**header, "format": "other"}, buf)
    with pytest.raises(StateFormatError, match="truncated"):
        unpack_blob(header, buf[:3])
    bad = {**header, "tensors": [["t", "torch.nope", [4], 0, 16]]}
    with pytest.raises(StateFormatError, match="unknown dtype"):
        unpack_blob(bad, buf)
