"""`linear`: `F.linear` with faster CPU paths for the few-row products of decode.

Decode multiplies one row (or a few: one per batched session) by every weight matrix, so its
speed is the rate at which the weights stream from memory, and with a few rows, how well the
product is blocked. On CPU, torch's BLAS (MKL) does neither well in the shape `F.linear` asks
for, `x [M, K] @ W^T`: for one row it runs a matrix-vector product on a single thread whatever
`torch.get_num_threads()` says (SmolLM2's 30 layers and lm_head: 44 ms per token, about 12 GB/s),
and 16 rows take 65 ms. `linear` picks by the number of rows:

- up to `MAX_ROWS` rows, where the native kernels are built (`streamctx.operators.cpu`, AVX-512):
  `matmul_nt` over torch's threads (1-4 rows: one weight row at a time; more: 4x4 tiles).
  Each output is summed in an order fixed by K alone, so a session's row has the same bits in a
  batch of 16 as alone, at any thread count.
- without them: `rows <= COLUMN_MAX_ROWS`: `W @ x^T`, a matrix times a narrow column block
  (a lone row duplicated into two columns; one column is the slow matrix-vector call again);
  up to `MAX_ROWS` rows with 2+ threads: the weight's output rows in `CHUNKS` chunks as one
  batched matmul, which torch spreads over its threads.
- anything else, including anything autograd must see: `F.linear`, which threads large products.

Measured on the dev machine (2 cores, SmolLM2's weights, all 30 layers + lm_head, ms, best of 5;
the machine's read rate swings with its neighbours, so compare within a row):

    rows           1     4     8    16    32    64
    F.linear      43.7  64.1  56.0  66.6  90.7 136
    torch paths   19.5  28.1  43.8  55.9  78.0 128
    native        18.0  27.9  29.5  36.0  64.9 123

The native kernel reads 1-4 rows' weights one row at a time, a single sequential stream per
thread: at a quiet moment one row took 11.5 ms (46 GB/s, as fast as `torch.sum`), where a tile
over four weight rows took 20 ms (benchmarks/results/model_notes.md).

Everything stays in torch's own OpenMP pool (the native library binds torch's libgomp): numpy's
OpenBLAS also splits small products over its threads but was 4x *slower* than torch inside the
real decode loop on 2 cores, because its pool and torch's spin-wait against each other.

`F.linear` is the reference: results agree within fp32 rounding, not bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from streamctx.operators import cpu as native

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
    `("native", 0)`, `("column", 0)`, `("chunked", chunks)` or `("plain", 0)` (`F.linear`)."""
    if not _enabled or rows < 1:
        return "plain", 0
    if rows <= MAX_ROWS and native.enabled():
        return "native", 0
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
    if (x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or x.dtype != torch.float32
            or weight.dtype != torch.float32 or x.device.type != "cpu" or weight.device.type != "cpu"
            or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                                      or tuple(bias.shape) != (weight.shape[0],)))
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)  # including its errors for shapes that do not fit
    m = x.shape[0]
    n, k = weight.shape
    path, chunks = choose_path(m, n, torch.get_num_threads())
    if path == "plain":
        return F.linear(x, weight, bias)
    if path == "native":  # dtypes, devices and weight layout checked above
        return native.matmul_nt_unchecked(x, weight, None if bias is None else bias.contiguous())
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
