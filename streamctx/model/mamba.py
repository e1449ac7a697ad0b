"""Mamba (v1) decoder in the Hugging Face `MambaForCausalLM` layout, on `selective_scan`.

Each session carries constant-size state per layer: the last `conv_kernel - 1` mixer inputs (the
causal depthwise conv's state) and the SSM state `[I, N]` in fp32. Feeding a sequence in any
split and carrying both gives the one-shot result (the scan is exact under splits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from streamctx.model.config import MambaConfig
from streamctx.model.functional import Weights, rms_norm
from streamctx.model.linear import linear
from streamctx.model.ops import selective_scan
from streamctx.operators.policies.base import CachePolicy
from streamctx.state import StateBlob


@dataclass
class MambaState:
    """Per-session recurrent state: conv `[L, I, K-1]` (model dtype), ssm `[L, I, N]` (fp32)."""

    conv: torch.Tensor
    ssm: torch.Tensor
    n_fed: int = 0
    closed: bool = field(default=False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))


@dataclass(frozen=True)
class _Layer:
    norm: torch.Tensor  # [H]
    w_in: torch.Tensor  # [2 I, H]
    b_in: torch.Tensor | None
    conv_w: torch.Tensor  # [I, 1, K]
    conv_b: torch.Tensor | None
    w_x: torch.Tensor  # [R + 2 N, I]
    w_dt: torch.Tensor  # [I, R]
    b_dt: torch.Tensor  # [I]
    A: torch.Tensor  # [I, N] = -exp(A_log), fp32
    D: torch.Tensor  # [I]
    w_out: torch.Tensor  # [H, I]
    b_out: torch.Tensor | None


class MambaModel:
    """A Mamba decoder whose sessions hold a `MambaState` (`weights` is consumed, as for Llama)."""

    kind = "mamba"

    def __init__(self, config: MambaConfig, weights: dict[str, torch.Tensor], *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 source: str = "checkpoint") -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        c = config
        h, v, e, n, r, k = (c.hidden_size, c.vocab_size, c.intermediate_size, c.state_size,
                            c.time_step_rank, c.conv_kernel)
        w = Weights(weights, dtype=dtype, device=self.device, source=source)
        self.embed = w.take("backbone.embeddings.weight", (v, h))  # [V, H]
        self.lm_head = self.embed if c.tie_word_embeddings else w.take("lm_head.weight", (v, h))
        self.norm_f = w.take("backbone.norm_f.weight", (h,))
        self.layers = []
        for i in range(c.num_layers):
            p = f"backbone.layers.{i}."
            m = p + "mixer."
            self.layers.append(_Layer(
                norm=w.take(p + "norm.weight", (h,)),
                w_in=w.take(m + "in_proj.weight", (2 * e, h)),
                b_in=w.maybe(m + "in_proj.bias", c.use_bias, (2 * e,)),
                conv_w=w.take(m + "conv1d.weight", (e, 1, k)),
                conv_b=w.maybe(m + "conv1d.bias", c.use_conv_bias, (e,)),
                w_x=w.take(m + "x_proj.weight", (r + 2 * n, e)),
                w_dt=w.take(m + "dt_proj.weight", (e, r)),
                b_dt=w.take(m + "dt_proj.bias", (e,)),
                A=-torch.exp(w.take(m + "A_log", (e, n), dtype=torch.float32)),
                D=w.take(m + "D", (e,)),
                w_out=w.take(m + "out_proj.weight", (h, e)),
                b_out=w.maybe(m + "out_proj.bias", c.use_bias, (h,)),
            ))
        w.finish()

    # -- sessions ---------------------------------------------------------------------------------
    def new_state(self) -> MambaState:
        c = self.config
        return MambaState(
            conv=torch.zeros(c.num_layers, c.intermediate_size, c.conv_kernel - 1, dtype=self.dtype, device=self.device),
            ssm=torch.zeros(c.num_layers, c.intermediate_size, c.state_size, dtype=torch.float32, device=self.device),
        )

    def state_nbytes(self, state: MambaState) -> int:
        return state.nbytes()

    def free_state(self, state: MambaState) -> None:
        state.conv = state.conv.new_empty(0)
        state.ssm = state.ssm.new_empty(0)
        state.closed = True

    def weight_nbytes(self) -> int:
        tensors = [self.embed, self.lm_head, self.norm_f]
        for layer in self.layers:
            tensors.extend(t for t in vars(layer).values() if t is not None)
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())

    def apply_policy(self, state: MambaState, policy: CachePolicy) -> None:
        """Recurrent state is already constant-size: KV policies do not apply."""
        return None

    # -- forward ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: Sequence[tuple[MambaState, torch.Tensor]], *,
                all_logits: Sequence[bool] | bool = False, key_mass: bool = False) -> list[torch.Tensor]:
        """Advance each session by its new tokens `ids [T_i]`; logits `[T_i, V]` or `[V]` (last)."""
        c = self.config
        flags = [all_logits] * len(batch) if isinstance(all_logits, bool) else list(all_logits)
        lens = [int(ids.shape[0]) for _, ids in batch]
        ids = batch[0][1] if len(batch) == 1 else torch.cat([ids for _, ids in batch])
        x = F.embedding(ids.to(self.device), self.embed)  # [N, H]
        inner, n_state, rank = c.intermediate_size, c.state_size, c.time_step_rank
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.norm, c.layer_norm_epsilon)
            xz = linear(h, layer.w_in, layer.b_in)  # [N, 2 I]
            outs = []
            off = 0
            for (state, _), n in zip(batch, lens):
                seg = xz[off:off + n].t()  # [2 I, n]
                off += n
                u, z = seg[:inner], seg[inner:]
                u = self._conv(u, layer, state, li)  # [I, n]
                dbc = linear(u.t(), layer.w_x)  # [n, R + 2 N]
                dt, bb, cc = torch.split(dbc, [rank, n_state, n_state], dim=-1)
                delta = linear(dt, layer.w_dt)  # [n, I]; bias goes in the scan as delta_bias
                y, state.ssm[li] = selective_scan(
                    u[None], delta.t()[None], layer.A, bb.t()[None], cc.t()[None], layer.D, z[None],
                    delta_bias=layer.b_dt, delta_softplus=True, initial_state=state.ssm[li][None],
                    return_state=True,
                )
                outs.append(y[0].t())  # [n, I]
            y_all = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + linear(y_all, layer.w_out, layer.b_out)
        for (state, _), n in zip(batch, lens):
            state.n_fed += n
        rows, off = [], 0
        for n, flag in zip(lens, flags):
            rows.append(x[off:off + n] if flag else x[off + n - 1:off + n])
            off += n
        sel = rows[0] if len(rows) == 1 else torch.cat(rows)
        logits = linear(rms_norm(sel, self.norm_f, c.layer_norm_epsilon), self.lm_head)
        out, off = [], 0
        for r, flag in zip(rows, flags):
            out.append(logits[off:off + r.shape[0]] if flag else logits[off])
            off += r.shape[0]
        return out

    def _conv(self, u: torch.Tensor, layer: _Layer, state: MambaState, li: int) -> torch.Tensor:
        """Causal depthwise conv + SiLU over `u [I, n]`, carrying the last K-1 inputs."""
        k1 = self.config.conv_kernel - 1
        full = torch.cat([state.conv[li], u], dim=-1)  # [I, K-1+n]
        if k1:
            state.conv[li] = full[:, -k1:]
        y = F.conv1d(full[None], layer.conv_w, layer.conv_b, groups=u.shape[0])[0]  # [I, n]
        return F.silu(y)

    # -- state as data ----------------------------------------------------------------------------
    def state_to_blob(self, state: MambaState) -> StateBlob:
        return StateBlob("mamba.session", {"conv": state.conv.clone(), "ssm": state.ssm.clone()},
                         {"n_fed": state.n_fed})

    def state_from_blob(self, blob: StateBlob) -> MambaState:
        want = self.new_state()
        for name in ("conv", "ssm"):
            t = blob.tensors.get(name)
            ref = getattr(want, name)
            if t is None or t.shape != ref.shape:
                raise ValueError(f"session state does not fit this model: {name} "
                                 f"{None if t is None else list(t.shape)}, expected {list(ref.shape)}")
            ref.copy_(t)
        want.n_fed = int(blob.meta["n_fed"])
        return want
