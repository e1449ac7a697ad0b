"""Small functional pieces shared by the decoders."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back (as Hugging Face does): `x [..., H]`."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def take(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Pop a weight by Hugging Face name with a clear error if the checkpoint lacks it."""
    from streamctx.model.config import ModelLoadError

    try:
        return weights[name]
    except KeyError:
        raise ModelLoadError(f"checkpoint is missing tensor {name!r}") from None
