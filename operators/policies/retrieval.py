"""`retrieval` (InfLLM / Quest style): sinks + a local window + the top-k evicted blocks.

Evicted tokens leave the cache `block` at a time and live in host memory (pinned on CUDA) with
representatives per block and KV head: the mean key (InfLLM-style, `score="mean"`) and the
channel-wise min/max (Quest's upper bound of `q . k`, `score="bound"`). Each query scores the
blocks through a softmax over blocks per query head; a group of `q_group` queries takes the max
over its queries, summed over heads. The best blocks are fetched (`neighbors=True` adds each
chosen block's better-scoring neighbour, so a fact cut by a block boundary comes back whole),
attended and merged with the exact local attention through the lse. A prefill chunk retrieves
per group of `q_group` queries, scored by the representatives. The query that predicts the next
token (the last of a chunk, every decode step) retrieves for itself, and with `exact_last` it
scores every stored key: a block's score is the attention mass it would get from that query
(per head, the log-sum-exp of its logits over the block, a softmax over blocks, summed over
heads). A passkey block is one sharp match among filler: its mean key is weak, and on SmolLM2 at
16K (depth 0.9) the mean put the key's blocks in that query's selection in 13 of 30 layers while
filler blocks that most queries like (the intro's, two mid-stream ones) took slots in nearly all. The exact score costs one
pass over the host keys per lone query (a decode step reads them once, as full attention
would); groups keep the representatives, which read one key per block.

RoPE rule: sinks at 0..s-1, then a gap of `topk * block` positions, then the window (new tokens
continue after it). Retrieved blocks fill the gap in stream order, whichever they are: block i of
the selection sits at `s + i * block + j`. Stored keys are rotated as if at the gap's first block
(`s + j`), so placing one costs one rotation by `i * block`; the representatives are computed from
those stored keys, so scores see the distance the attention will see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from streamctx.operators.attn import attention, merge_attention
from streamctx.operators.policies._bounded import (
    BoundedPolicy, check_non_negative, check_positive, grouped, laid_out, require_rotate,
)
from streamctx.operators.policies.base import KEEP_ALL, CacheView, Keep, Rotate


class HostBlocks:
    """Evicted blocks of one layer on host: K/V `[Hkv, NB, block, D]`, bounds `[Hkv, NB, D]`,
    original token positions `[NB, block]`.

    Storage grows by doubling (amortised O(1) appends); pinned when CUDA is available so fetches
    can overlap compute.
    """

    def __init__(self, hkv: int, block: int, d: int, dtype: torch.dtype) -> None:
        self.n = 0
        self.pin = torch.cuda.is_available()
        shape = (hkv, 4, block, d)
        self.k, self.v = self._alloc(shape, dtype), self._alloc(shape, dtype)
        self.kmin, self.kmax = self._alloc((hkv, 4, d), dtype), self._alloc((hkv, 4, d), dtype)
        self.kmean = self._alloc((hkv, 4, d), dtype)
        self.pos = torch.empty(4, block, dtype=torch.int64)

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _grow(self, need: int) -> None:
        cap = self.k.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in ("k", "v", "kmin", "kmax", "kmean"):
            old = getattr(self, name)
            t = self._alloc((old.shape[0], new, *old.shape[2:]), old.dtype)
            t[:, :self.n] = old[:, :self.n]
            setattr(self, name, t)
        pos = torch.empty(new, self.pos.shape[1], dtype=torch.int64)
        pos[:self.n] = self.pos[:self.n]
        self.pos = pos

    def add(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Append blocks `k, v [Hkv, nb, block, D]` of the tokens at `positions [nb, block]`."""
        nb = k.shape[1]
        self._grow(self.n + nb)
        sl = slice(self.n, self.n + nb)
        self.k[:, sl], self.v[:, sl] = k.cpu(), v.cpu()
        self.kmin[:, sl], self.kmax[:, sl] = k.amin(2).cpu(), k.amax(2).cpu()
        self.kmean[:, sl] = k.mean(2).cpu()
        self.pos[sl] = positions.cpu()
        self.n += nb

    def nbytes(self) -> int:
        """Bytes of the stored blocks and their bounds (what is used, not the reserve)."""
        per = self.k[:, :1].numel() * 2 + self.kmin[:, :1].numel() * 3
        return self.n * per * self.k.element_size()


@dataclass
class RetrievalPolicy(BoundedPolicy):
    name: ClassVar[str] = "retrieval"
    extends_attention: ClassVar[bool] = True
    sinks: int = 4
    window: int = 508
    topk: int = 8
    block: int = 64
    q_group: int = 16
    score: Literal["mean", "bound"] = "mean"
    neighbors: bool = True
    slack: int = 64
    exact_last: bool = True
    _host: dict[int, HostBlocks] = field(default_factory=dict, repr=False, compare=False)
    last_selection: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positive(window=self.window, topk=self.topk, block=self.block, q_group=self.q_group)
        check_non_negative(sinks=self.sinks, slack=self.slack)
        if self.score not in ("mean", "bound"):
            raise ValueError(f'score must be "mean" or "bound", got {self.score!r}')
        if self.slack < self.block - 1:  # whole blocks leave the cache: the cap needs this slack
            raise ValueError(f"slack ({self.slack}) must be at least block - 1 ({self.block - 1})")

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    @property
    def extra_keys(self) -> int:
        return self.topk * self.block

    def config(self) -> dict:
        out = super().config()
        out.pop("_host", None)
        out.pop("last_selection", None)
        return out

    def host_nbytes(self) -> int:
        return sum(h.nbytes() for h in self._host.values())

    def host_blocks(self, layer: int) -> HostBlocks | None:
        return self._host.get(layer)

    _FIELDS = ("k", "v", "kmin", "kmax", "kmean", "pos")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, h in self._host.items():
            for name in self._FIELDS:
                t = getattr(h, name)
                out[f"{layer}.{name}"] = (t[:h.n] if name == "pos" else t[:, :h.n]).contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for layer in sorted({int(k.split(".")[0]) for k in tensors}):
            k = tensors[f"{layer}.k"]
            h = HostBlocks(k.shape[0], k.shape[2], k.shape[3], k.dtype)
            h._grow(k.shape[1])
            for name in self._FIELDS:
                t = tensors[f"{layer}.{name}"]
                if name == "pos":
                    h.pos[:t.shape[0]] = t
                else:
                    getattr(h, name)[:, :t.shape[1]] = t
            h.n = k.shape[1]
            self._host[layer] = h

    # -- eviction ---------------------------------------------------------------------------------
    def decide(self, view: CacheView) -> Keep:
        if not self.over(view):
            return KEEP_ALL
        rotate = require_rotate(view, self.name)
        s = min(self.sinks, view.length)
        e = (view.length - s - self.window) // self.block * self.block
        ev = slice(s, s + e)
        hkv, _, d = view.keys.shape
        nb = e // self.block
        target = (torch.arange(self.block) + self.sinks).repeat(nb).to(view.rope_positions.device)
        k = rotate(view.keys[:, ev], target - view.rope_positions[ev])
        host = self._host.get(view.layer)
        if host is None:
            host = self._host[view.layer] = HostBlocks(hkv, self.block, d, view.keys.dtype)
        host.add(k.reshape(hkv, nb, self.block, d), view.values[:, ev].reshape(hkv, nb, self.block, d),
                 view.positions[ev].reshape(nb, self.block))
        idx = torch.cat([torch.arange(s), torch.arange(s + e, view.length)])
        rope = laid_out(s, idx.numel() - s, self.extra_keys + self.sinks - s)
        return Keep(idx, rope, int(rope[-1]) + 1)

    # -- retrieval --------------------------------------------------------------------------------
    def select(self, host: HostBlocks, q: torch.Tensor) -> torch.Tensor:
        """Block ids `[G, k]` (ascending per row) for the query groups `q [Hq, G, m, D]`.

        Zero rows (padding of the first group) take part in no score.
        """
        hkv = host.k.shape[0]
        qg = grouped(q.float(), hkv)  # [Hkv, Gh, G, m, D]
        if self.score == "mean":
            s = torch.einsum("hgcid,hbd->hgcib", qg, host.kmean[:, :host.n].to(q.device, torch.float32))
        else:
            kmin = host.kmin[:, :host.n].to(q.device, torch.float32)
            kmax = host.kmax[:, :host.n].to(q.device, torch.float32)
            s = (torch.einsum("hgcid,hbd->hgcib", qg.clamp(min=0), kmax)
                 + torch.einsum("hgcid,hbd->hgcib", qg.clamp(max=0), kmin))
        real = (qg != 0).any(-1, keepdim=True)  # [Hkv, Gh, G, m, 1]
        score = (torch.softmax(s * q.shape[-1] ** -0.5, dim=-1) * real).amax(dim=3).sum(dim=(0, 1))
        return self.pick(score.cpu())

    def select_exact(self, host: HostBlocks, q: torch.Tensor) -> torch.Tensor:
        """Block ids `[1, k]` for one query `q [Hq, D]`, scored by the attention mass each block
        would get from it: per head, the log-sum-exp of its logits over the block's stored keys,
        a softmax over blocks, summed over heads. One query reads every stored key once."""
        hkv, _, bs, d = host.k.shape
        qg = grouped(q[:, None].float(), hkv)[:, :, 0]  # [Hkv, Gh, D]
        keys = host.k[:, :host.n].to(q.device, torch.float32)  # [Hkv, NB, bs, D]
        logits = torch.einsum("hgd,hnbd->hgnb", qg, keys) * d ** -0.5
        score = torch.softmax(torch.logsumexp(logits, dim=-1), dim=-1).sum(dim=(0, 1))  # [NB]
        return self.pick(score[None].cpu())

    def pick(self, score: torch.Tensor) -> torch.Tensor:
        """`[G, NB]` scores -> `[G, k]` ascending ids: the best blocks, each with its better
        neighbour when `neighbors` (until k are chosen)."""
        k = min(self.topk, score.shape[1])
        if not self.neighbors or k < 2:
            return torch.sort(torch.topk(score, k, dim=-1).indices, dim=-1).values
        nb = score.shape[1]
        rows = []
        for row in score:
            chosen: dict[int, None] = {}
            for b in torch.topk(row, k).indices.tolist():
                if len(chosen) >= k:
                    break
                chosen[b] = None
                near = [j for j in (b - 1, b + 1) if 0 <= j < nb and j not in chosen]
                if near and len(chosen) < k:
                    chosen[max(near, key=lambda j: float(row[j]))] = None
            if len(chosen) < k:  # neighbours collided: fill with the next best
                for b in torch.argsort(row, descending=True).tolist():
                    if len(chosen) >= k:
                        break
                    chosen.setdefault(b, None)
            rows.append(sorted(chosen))
        return torch.tensor(rows, dtype=torch.int64)

    def fetch(self, host: HostBlocks, ids: torch.Tensor, device: torch.device,
              rotate: Rotate) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks `ids [G, k]` placed in the gap: keys/values `[G, Hkv, k * block, D]` on `device`."""
        hkv, _, bs, d = host.k.shape
        g = ids.shape[0]
        flat = ids.reshape(-1)
        k = host.k[:, flat].to(device, non_blocking=True).view(hkv, g, -1, d).transpose(0, 1)
        v = host.v[:, flat].to(device, non_blocking=True).view(hkv, g, -1, d).transpose(0, 1)
        shift = (torch.arange(ids.shape[1], device=device) * bs).repeat_interleave(bs)
        return rotate(k, shift), v

    def extend(self, layer: int, q: torch.Tensor, q_rope_positions: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, rotate: Rotate) -> torch.Tensor:
        """Each group of `q_group` queries attends its own top-k blocks; the last query (the one
        that predicts the next token) is a group of its own, so the other queries of its group
        cannot outvote the blocks it needs. All groups run as one batch, each zero-padded in front."""
        host = self._host.get(layer)
        if host is None or host.n == 0:
            return out
        qp, rows = self.query_groups(q)
        last = self.select_exact(host, q[:, -1]) if self.exact_last else None
        if last is None:
            ids = self.select(host, qp)
        elif qp.shape[1] > 1:
            ids = torch.cat([self.select(host, qp[:, :-1]), last])
        else:
            ids = last
        self.last_selection[layer] = list(ids)
        k, v = self.fetch(host, ids, q.device, rotate)
        o2, l2 = attention(qp.transpose(0, 1), k, v, causal=False, return_lse=True)  # [G, Hq, m, *]
        hq, g, m, d = qp.shape
        o2 = o2.transpose(0, 1).reshape(hq, g * m, d)[:, rows]
        l2 = l2.transpose(0, 1).reshape(hq, g * m)[:, rows]
        return merge_attention(out, lse, o2, l2)[0]

    def query_groups(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries `q [Hq, n, D]` as groups `[Hq, G, m, D]` and the rows `[n]` of the flattened
        groups holding queries 0..n-1: groups of `q_group` over the first n - 1 queries, then the
        last query alone (each group zero-padded in front to m rows)."""
        hq, n, d = q.shape
        m = min(self.q_group, n)
        n1 = n - 1
        g1 = -(-n1 // m)
        pad = g1 * m - n1
        z = q.new_zeros(hq, 1, d)
        qp = torch.cat([z.expand(hq, pad, d), q[:, :n1], z.expand(hq, m - 1, d), q[:, n1:]], dim=1)
        rows = torch.cat([torch.arange(pad, pad + n1), torch.tensor([(g1 + 1) * m - 1])])
        return qp.view(hq, g1 + 1, m, d), rows
