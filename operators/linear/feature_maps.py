"""Feature maps phi for linear attention: softmax(q k^T) is replaced by phi(q) phi(k)^T.

- "elu":    elu(x) + 1 (Katharopoulos et al.), positive, the usual default.
- "relu":   relu(x), non-negative (rows can be all zero: the normaliser carries an epsilon).
- "random": Performer's positive random features for the softmax kernel,
            phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = x / Dk^(1/4) and W `[m, Dk]` ~ N(0, 1),
            so that E[phi(q) . phi(k)] = exp(q . k / sqrt(Dk)). W comes from an explicit
            `projection` or from `random_projection(dk, m, seed)`: the same seed gives the same
            features in every call, which is what carrying a state across calls requires.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["FeatureMap", "apply_feature_map", "random_projection"]

FeatureMap = Literal["elu", "relu", "random"]


def random_projection(dk: int, num_features: int | None = None, *, seed: int = 0,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Seeded Gaussian projection `[m, Dk]` (m defaults to Dk) for the "random" feature map."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(num_features or dk, dk, generator=gen, dtype=torch.float64)
    return w.to(dtype=dtype, device=device)


def apply_feature_map(x: torch.Tensor, kind: FeatureMap = "elu", *,
                      projection: torch.Tensor | None = None) -> torch.Tensor:
    """phi(x): `[..., Dk]` -> `[..., Dk]` ("elu", "relu") or `[..., m]` ("random", needs `projection`)."""
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    if kind == "random":
        if projection is None:
            raise ValueError('feature_map="random" needs a projection [m, Dk] (see random_projection)')
        if projection.shape[-1] != x.shape[-1]:
            raise ValueError(f"projection must be [m, Dk={x.shape[-1]}]; got {tuple(projection.shape)}")
        xs = x * x.shape[-1] ** -0.25
        proj = xs @ projection.to(x.dtype).T
        return torch.exp(proj - 0.5 * (xs * xs).sum(-1, keepdim=True)) * projection.shape[0] ** -0.5
    raise ValueError(f'feature_map must be "elu", "relu" or "random"; got {kind!r}')
