"""`linear`: `F.linear` with faster CPU paths for the few-row products of decode.

Decode multiplies one row (or a few: one per batched session) by every weight matrix, so its
speed is the rate at which the weights stream from memory. On CPU, torch's BLAS (MKL) streams
them slowly in the shape `F.linear` asks for, `x [M, K] @ W^T`: for one row it runs a
matrix-vector product on a single thread whatever `torch.get_num_threads()` says (SmolLM2's 30
layers and lm_head: 44 ms per token, about 12 GB/s, at 1 and at 2 threads alike). Two other
shapes of the same product are faster, and `linear` picks by the number of rows:

- `rows <= COLUMN_MAX_ROWS`: `W @ x^T`, a matrix times a narrow column block, with a lone row
  duplicated into two columns (one column is the slow matrix-vector call again). MKL streams W
  for this at 32 GB/s on 2 threads: 17 ms per token, 2.5x `F.linear`; 1.5x at 1 thread.
- up to `MAX_ROWS` rows with 2+ threads: the weight's output rows in `CHUNKS` chunks run as
  one batched matmul, which torch spreads over its threads (1.1-1.3x at 8-32 rows, even at 64).
- anything else, including anything autograd must see: `F.linear`, which threads large products.

Measured on the dev machine (2 cores, SmolLM2's shapes, all 30 layers + lm_head, ms):

    rows           1     2     3     4     8    16    32    64
    F.linear, 2t  43.6  72.3  92.2  60.4  54.1  64.6  87.9 130
    W @ x^T, 2t   17.2  17.7  25.4  27.0  43.6  59.1  82.3 138
    chunked, 2t   23.9  35.7  43.4  35.6  41.1  52.7  74.4 128
    F.linear, 1t  42.6  71.2  89.2  60.0  70.8  92.7 134   224
    W @ x^T, 1t   28.6  29.0  45.2  48.7  79.7 106   152   247

Both stay in torch's own thread pool: numpy's OpenBLAS also splits small products over its
threads (22 ms per token in isolation) but was 4x *slower* than torch inside the real decode
loop on 2 cores, because its pool and torch's OpenMP pool spin-wait against each other.

The chunk count is fixed (`CHUNKS`, not derived from the thread count), so 2, 4 or 8 threads
give the same bits; `F.linear` itself does not promise that (on the dev machine its 5-row
products differ in the last bit between 1 and 2 threads). `F.linear` is the reference: results
agree within fp32 rounding, not necessarily bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

COLUMN_MAX_ROWS = 4  # at most this many rows: W @ x^T
MAX_ROWS = 64  # above this, F.linear (its BLAS call is threaded there)
CHUNKS = 8  # row chunks of the chunked path: enough to keep a few threads evenly loaded
MIN_CHUNK_ROWS = 16  # weight rows per chunk, at least: tiny chunks are per-call overhead
_enabled = True


@contextmanager
def split_linear(enabled: bool) -> Iterator[None]:
    """Turn the fast paths on or off inside the block (process-wide; benchmarks compare the two)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def choose_path(rows: int, out_features: int, threads: int) -> tuple[str, int]:
    """The path for an `[rows, K] x [out_features, K]^T` product at `threads` torch threads:
    `("column", 0)`, `("chunked", chunks)` or `("plain", 0)` (`F.linear`)."""
    if not _enabled or rows < 1:
        return "plain", 0
    if rows <= COLUMN_MAX_ROWS:
        return "column", 0
    chunks = min(CHUNKS, out_features // MIN_CHUNK_ROWS)
    if threads >= 2 and rows <= MAX_ROWS and chunks >= 2:
        return "chunked", chunks
    return "plain", 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [M, K] @ weight [N, K]^T (+ bias [N])` -> `[M, N]`, the same as `F.linear(x, weight, bias)`.

    fp32 CPU products of at most `MAX_ROWS` rows take the faster shapes of the module docstring;
    everything else, and anything autograd must see, is `F.linear` itself (which also takes
    `x [..., K]`). The result is contiguous.
    """
    if (x.dim() != 2 or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or weight.device.type != "cpu" or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)
    m = x.shape[0]
    n, k = weight.shape
    path, chunks = choose_path(m, n, torch.get_num_threads())
    if path == "plain":
        return F.linear(x, weight, bias)
    if path == "column":
        cols = x.expand(2, k).contiguous() if m == 1 else x.contiguous()  # [M', K], M' >= 2
        out = torch.matmul(weight, cols.t()).t()[:m].contiguous()  # [N, M'] -> [M, N]
    else:
        per = n // chunks
        main = chunks * per
        w = weight[:main].view(chunks, per, k).transpose(1, 2)  # [C, K, N/C], a view
        y = torch.matmul(x, w)  # [C, M, N/C]: the batch is spread over torch's threads
        if main == n:
            out = y.transpose(0, 1).reshape(m, n)
        else:
            out = x.new_empty(m, n)
            out[:, :main].view(m, chunks, per).copy_(y.transpose(0, 1))
            out[:, main:] = F.linear(x, weight[main:])
    if bias is not None:
        out.add_(bias)
    return out
