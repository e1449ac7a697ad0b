"""`linear`: `F.linear` with a faster CPU path for the few-row products of decode.

Decode multiplies one row (or a few: one per batched session) by every weight matrix, so its
speed is the rate at which the weights stream from memory. On CPU, torch runs such a product
as one BLAS call that uses a single thread whatever `torch.get_num_threads()` says (SmolLM2's
30 layers and lm_head: 46 ms per token, about 12 GB/s, at 1 and at 2 threads alike). Split the
weight's output rows into `C` equal chunks and run them as one batched matmul instead: torch
spreads the batch over its threads, each chunk streams its own rows, and the same product takes
25 ms at 2 threads (1.9x). It stays in torch's own thread pool: numpy's OpenBLAS, which also
splits small products over its threads (22 ms in isolation), was 4x *slower* than torch inside
the real decode loop on 2 cores, because its pool and torch's OpenMP pool spin-wait against
each other between calls.

With one thread there is nothing to spread the chunks over, and the chunked product costs a
little (SmolLM2 decode at 1 thread: 15.2 vs 15.7 tokens/s), so one thread takes `F.linear`. The
chunk count itself is fixed (`CHUNKS`, not derived from the thread count), so 2, 4 or 8 threads
give the same bits. Between 1 and 2 threads the last bit may differ on some shapes, as it already
does for `F.linear` itself (on the dev machine its 5-row products differ between 1 and 2 threads).

Measured on the dev machine (2 cores, SmolLM2's shapes, all 30 layers + lm_head; F.linear time /
split time) at 2 threads: rows 1-12: 1.5-2.3x; 16-32: 1.3-1.4x; 64: 1.1x; 96: even.

`F.linear` is the reference: results agree within fp32 rounding (bit for bit on SmolLM2's shapes
here, not in general: chunk edges can change the BLAS kernel's tiling).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

MAX_ROWS = 64  # products with more rows go to F.linear, whose BLAS call is threaded there
CHUNKS = 8  # row chunks per product: enough to keep a few threads evenly loaded
MIN_CHUNK_ROWS = 16  # weight rows per chunk, at least: tiny chunks are per-call overhead
_enabled = True


@contextmanager
def split_linear(enabled: bool) -> Iterator[None]:
    """Turn the split path on or off inside the block (process-wide; benchmarks compare the two)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def split_chunks(rows: int, out_features: int, threads: int) -> int:
    """How many weight-row chunks an `[rows, K] x [out_features, K]^T` product is split into at
    `threads` torch threads: 0 means one plain `F.linear` call."""
    if not _enabled or threads < 2 or not 0 < rows <= MAX_ROWS:
        return 0
    chunks = min(CHUNKS, out_features // MIN_CHUNK_ROWS)
    return chunks if chunks >= 2 else 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [M, K] @ weight [N, K]^T (+ bias [N])` -> `[M, N]`, the same as `F.linear(x, weight, bias)`.

    fp32 CPU products with at most `MAX_ROWS` rows run as a batched matmul over row chunks of
    `weight` (see the module docstring); everything else, and anything autograd must see, is
    `F.linear` itself (which also takes `x [..., K]`).
    """
    if (x.dim() != 2 or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or weight.device.type != "cpu" or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)
    m = x.shape[0]
    n, k = weight.shape
    chunks = split_chunks(m, n, torch.get_num_threads())
    if not chunks:
        return F.linear(x, weight, bias)
    per = n // chunks
    main = chunks * per
    w = weight[:main].view(chunks, per, k).transpose(1, 2)  # [C, K, N/C], a view
    y = torch.matmul(x, w)  # [C, M, N/C]: the batch is spread over torch's threads
    if main == n:
        out = y.transpose(0, 1).reshape(m, n)  # a view when M == 1
    else:
        out = x.new_empty(m, n)
        out[:, :main].view(m, chunks, per).copy_(y.transpose(0, 1))
        out[:, main:] = F.linear(x, weight[main:])
    if bias is not None:
        out.add_(bias)
    return out
