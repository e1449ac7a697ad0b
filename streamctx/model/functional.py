"""Small pieces shared by the decoders: RMSNorm, the SwiGLU step and a consuming weight reader.

Decode-sized inputs (at most `NATIVE_MAX_ROWS` rows, fp32 CPU) take the native kernels where
they are built (`streamctx.operators.cpu`): one pass each, where torch's RMSNorm is several ops
(~40 us a call for 16 rows); per row the same bits in any batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamctx.model.config import ModelLoadError
from streamctx.operators import cpu as native

NATIVE_MAX_ROWS = 64  # decode-sized inputs take the native kernels; larger ones torch's ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back (as Hugging Face does): `x [..., H]`."""
    if _native_rows(x, weight) and weight.dim() == 1 and weight.shape[0] == x.shape[1]:
        return native.rms_norm_unchecked(x, weight.contiguous(), eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)  # one fused op, same math
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, the SwiGLU MLP's middle step: `[N, I]`."""
    if _native_rows(gate, up) and gate.shape == up.shape:
        return native.silu_mul_unchecked(gate, up)
    return F.silu(gate).mul_(up)


def _native_rows(x: torch.Tensor, other: torch.Tensor) -> bool:
    """A decode-sized fp32 CPU input that no autograd sees, with the native kernels built."""
    return (x.dim() == 2 and x.shape[0] <= NATIVE_MAX_ROWS and x.dtype == torch.float32
            and other.dtype == torch.float32 and x.device.type == "cpu" and other.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or other.requires_grad)) and native.enabled())


class Weights:
    """Takes tensors out of a Hugging Face-named dict (freeing them from it as it goes, so a load
    never holds two copies of the model), converted to the model's dtype and device."""

    def __init__(self, weights: dict[str, torch.Tensor], *, dtype: torch.dtype, device: torch.device,
                 source: str = "checkpoint") -> None:
        self._w = weights
        self.dtype = dtype
        self.device = device
        self.source = source

    def take(self, name: str, shape: tuple[int, ...] | None = None, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        try:
            t = self._w.pop(name)
        except KeyError:
            raise ModelLoadError(f"{self.source}: missing tensor {name!r}") from None
        if shape is not None and tuple(t.shape) != shape:
            raise ModelLoadError(
                f"{self.source}: tensor {name!r} has shape {list(t.shape)}, but the config expects {list(shape)}"
            )
        t = t.to(device=self.device, dtype=dtype or self.dtype)
        if t.device.type == "cpu" and t.dim() == 2 and t.data_ptr() % 64:
            # A matrix read in place from a mapped file whose data is only 8-byte aligned (most
            # safetensors files): rows straddling cache lines stream 1.5x slower through the native
            # decode kernels, so it gets an aligned copy (the allocator aligns to 64 bytes).
            t = t.clone()
        return t

    def maybe(self, name: str, present: bool, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        return self.take(name, shape) if present else None

    def finish(self) -> None:
        """Every tensor must have been used: leftovers mean the config does not match the weights."""
        if self._w:
            names = sorted(self._w)
            more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
            raise ModelLoadError(
                f"{self.source}: tensors not used by a model with this config: {', '.join(names[:5])}{more}"
            )
