"""The library API: `Engine` (a loaded model, its tokenizer and KV block pool) and `Session`
(one conversation's state: feed text or ids, generate, chat, save/restore, close).

    engine = Engine.load("smollm2")
    s = engine.session("conv-42")
    s.feed("The capital of France is")
    s.generate(max_new_tokens=8).text

Sessions of both model families (Llama: paged KV cache; Mamba: constant-size recurrent state)
behave identically. Generation keeps the last sampled token *pending*: it is fed at the start of
the next call, so N generated tokens cost N - 1 decode steps, like any generate loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from streamctx.model.config import LlamaConfig, MambaConfig, ModelConfig, ModelLoadError, config_to_dict
from streamctx.model.sampling import Sampler, SamplingParams
from streamctx.operators.policies import CachePolicy, make_policy
from streamctx.state import StateBlob, StateFormatError

__all__ = ["Engine", "EngineError", "FeedResult", "GenerateResult", "Session"]


class EngineError(ValueError):
    """Bad input to the engine or a session (the message names the argument and the value)."""


@dataclass(frozen=True)
class FeedResult:
    """n_tokens: tokens fed by this call; logits `[n_tokens, V]` when asked (else None)."""

    n_tokens: int
    logits: torch.Tensor | None = None


@dataclass(frozen=True)
class GenerateResult:
    """text: decoded new tokens (cut before a stop string); finish_reason: "eos", "stop" or "length"."""

    text: str
    token_ids: list[int]
    finish_reason: str
    seconds: float = 0.0


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in named:
            raise EngineError(f"dtype {dtype!r} is not one of {', '.join(named)}")
        return named[dtype]
    return dtype


def _fingerprint(config: ModelConfig) -> str:
    blob = json.dumps(config_to_dict(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Engine:
    """A loaded decoder with its tokenizer; creates and tracks sessions."""

    def __init__(self, model: Any, tokenizer: Any, *, policy: str | Mapping[str, Any] = "full",
                 prefill_chunk: int = 512, source: str = "") -> None:
        if prefill_chunk < 1:
            raise EngineError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.prefill_chunk = prefill_chunk
        self.source = source
        self.policy_spec = policy
        make_policy(policy)  # validate now: unknown names fail at load, not at first feed
        self.fingerprint = _fingerprint(self.config)
        self.sessions: dict[str, Session] = {}

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str], *, policy: str | Mapping[str, Any] = "full",
             dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
             prefill_chunk: int = 512, block_size: int = 64,
             cache_dir: str | os.PathLike[str] | None = None) -> "Engine":
        """Load "smollm2", a .gguf file or a Hugging Face folder (weights via the loader only).

        dtype: default fp32 on CPU, bf16 on CUDA. policy: a KV policy name or dict (`"full"`).
        prefill_chunk: long feeds are processed in chunks of this many tokens.
        """
        from streamctx.model.loading import load_checkpoint

        make_policy(policy)
        dev = _default_device(device)
        dt = _default_dtype(dtype, dev)
        ckpt = load_checkpoint(name_or_path, dtype=dt, cache_dir=cache_dir)
        weights = ckpt.weights  # consumed by the model as it converts them: one copy of the weights at a time
        if isinstance(ckpt.config, LlamaConfig):
            from streamctx.model.llama import LlamaModel

            model: Any = LlamaModel(ckpt.config, weights, dtype=dt, device=dev, block_size=block_size,
                                    source=ckpt.source)
        elif isinstance(ckpt.config, MambaConfig):
            from streamctx.model.mamba import MambaModel

            model = MambaModel(ckpt.config, weights, dtype=dt, device=dev, source=ckpt.source)
        else:  # pragma: no cover - the loader only returns the two families
            raise ModelLoadError(f"unsupported model config {type(ckpt.config).__name__}")
        return cls(model, ckpt.tokenizer, policy=policy, prefill_chunk=prefill_chunk, source=ckpt.source)

    # -- sessions ---------------------------------------------------------------------------------
    def session(self, session_id: str, *, state: bytes | None = None) -> "Session":
        """The live session `session_id`, or a new one (restored from `state` bytes if given)."""
        if not isinstance(session_id, str) or not session_id:
            raise EngineError(f"session id must be a non-empty string, got {session_id!r}")
        live = self.sessions.get(session_id)
        if live is not None:
            if state is not None:
                raise EngineError(f"session {session_id!r} is live; close it before restoring state into it")
            return live
        s = Session(self, session_id) if state is None else Session._restore(self, session_id, state)
        self.sessions[session_id] = s
        return s

    def _forward(self, batch: Sequence[tuple["Session", torch.Tensor]], all_logits: Sequence[bool]) -> list[torch.Tensor]:
        """One model step over several sessions' new tokens, then each session's policy."""
        key_mass = any(s.policy.needs_key_mass for s, _ in batch)
        out = self.model.forward([(s.state, ids) for s, ids in batch], all_logits=all_logits, key_mass=key_mass)
        for s, _ in batch:
            if s.policy.bounded:
                self.model.apply_policy(s.state, s.policy)
        return out

    # -- scoring ----------------------------------------------------------------------------------
    def perplexity(self, text: str | Sequence[int], *, chunk_size: int | None = None) -> float:
        """exp(mean next-token NLL) of `text` under the engine's policy, fed in chunks."""
        ids = self._ids(text)
        if len(ids) < 2:
            raise EngineError(f"perplexity needs at least 2 tokens, got {len(ids)}")
        chunk = chunk_size or self.prefill_chunk
        s = Session(self, f"__perplexity_{id(ids)}")
        nll = torch.zeros((), dtype=torch.float64)
        try:
            prev: torch.Tensor | None = None  # logits of the previous chunk's last position
            for a in range(0, len(ids), chunk):
                part = torch.tensor(ids[a:a + chunk], dtype=torch.int64)
                logits = self._forward([(s, part)], [True])[0].float()
                if prev is not None:
                    logits = torch.cat([prev[None], logits])
                    targets = part
                else:
                    targets = part[1:]
                lp = torch.log_softmax(logits[: targets.shape[0]], dim=-1)
                nll += -lp.gather(1, targets[:, None].to(lp.device)).double().sum().cpu()
                prev = logits[-1]
        finally:
            s.close()
        return float(torch.exp(nll / (len(ids) - 1)))

    def _ids(self, text_or_ids: str | Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(text_or_ids, str):
            if not text_or_ids:
                raise EngineError("text is empty: nothing to feed")
            ids = self.tokenizer.encode(text_or_ids)
        elif isinstance(text_or_ids, torch.Tensor):
            if text_or_ids.dim() != 1 or text_or_ids.dtype.is_floating_point or text_or_ids.dtype == torch.bool:
                raise EngineError(f"token ids must be a 1-D integer tensor, got {text_or_ids.dtype} "
                                  f"{list(text_or_ids.shape)}")
            ids = [int(i) for i in text_or_ids.tolist()]
        else:
            try:
                ids = [int(i) for i in text_or_ids if not isinstance(i, bool) and int(i) == i]
            except (TypeError, ValueError) as exc:
                raise EngineError(f"expected text or a sequence of token ids: {exc}") from None
            if len(ids) != len(text_or_ids):
                raise EngineError("token ids must be integers")
        if not ids:
            raise EngineError("no tokens to feed (empty ids)")
        vocab = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise EngineError(f"token id {bad[0]} is out of the vocabulary [0, {vocab})"
                              + (f" ({len(bad)} such ids)" if len(bad) > 1 else ""))
        return ids

    # -- accounting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Live sessions, state bytes and, for paged models, block usage of the KV pool."""
        out: dict[str, Any] = {
            "model": self.config.architecture,
            "live_sessions": len(self.sessions),
            "state_bytes": sum(self.model.state_nbytes(s.state) for s in self.sessions.values()),
            "weight_bytes": self.model.weight_nbytes(),
        }
        # Evicted KV a policy keeps off the paged cache (retrieval's host blocks), counted apart.
        out["host_kv_bytes"] = sum(int(getattr(s.policy, "host_nbytes", lambda: 0)())
                                   for s in self.sessions.values())
        pool = getattr(self.model, "pool", None)
        if pool is not None:
            out.update(kv_bytes=pool.nbytes_used(), kv_reserved_bytes=pool.nbytes_reserved(),
                       blocks_used=pool.blocks_used(), blocks_total=pool.blocks_total(),
                       block_size=pool.block_size)
        else:
            out.update(kv_bytes=0, blocks_used=0, blocks_total=0)
        return out

    def __repr__(self) -> str:
        return f"Engine({self.config.architecture}, source={self.source!r}, sessions={len(self.sessions)})"


class Session:
    """One conversation: its model state, last logits and chat history."""

    def __init__(self, engine: Engine, session_id: str, *, policy: CachePolicy | None = None) -> None:
        self.engine = engine
        self.id = session_id
        self.policy: CachePolicy = policy or make_policy(engine.policy_spec)
        self.state = engine.model.new_state()
        self.last_logits: torch.Tensor | None = None  # [V] after the last fed token
        self.messages: list[dict[str, str]] = []
        self._pending: list[int] = []
        self.closed = False

    @property
    def n_tokens(self) -> int:
        """Tokens the session has seen (fed, plus a pending generated token)."""
        return self.state.n_fed + len(self._pending)

    def _check_open(self) -> None:
        if self.closed:
            raise EngineError(f"session {self.id!r} is closed")

    # -- feeding ----------------------------------------------------------------------------------
    def feed(self, text_or_ids: str | Sequence[int] | torch.Tensor, *, return_logits: bool = False) -> FeedResult:
        """Append text (tokenized without BOS) or token ids; logits `[T, V]` of those tokens if asked."""
        self._check_open()
        ids = self.engine._ids(text_or_ids)
        logits = self._feed_ids(ids, return_logits)
        return FeedResult(len(ids), logits)

    def _feed_ids(self, ids: list[int], return_logits: bool) -> torch.Tensor | None:
        pending, self._pending = self._pending, []
        full = pending + ids
        chunk = self.engine.prefill_chunk
        parts: list[torch.Tensor] = []
        for a in range(0, len(full), chunk):
            part = torch.tensor(full[a:a + chunk], dtype=torch.int64)
            out = self.engine._forward([(self, part)], [return_logits])[0]
            if return_logits:
                parts.append(out)
                self.last_logits = out[-1]
            else:
                self.last_logits = out
        if not return_logits:
            return None
        return torch.cat(parts)[len(pending):] if len(parts) > 1 or pending else parts[0]

    def _flush(self) -> None:
        if self._pending:
            self._feed_ids([], False)

    # -- generation -------------------------------------------------------------------------------
    def generate(self, max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None) -> GenerateResult:
        """Continue from what was fed: greedy at temperature 0, else seeded top-k/top-p sampling.

        Stops at an EOS token (not fed, not returned), at a `stop` string (text cut before it;
        its tokens stay in token_ids and in the session), or after max_new_tokens.
        """
        self._check_open()
        if max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        try:
            sampler = Sampler(SamplingParams(temperature, top_p, top_k, seed), device="cpu")
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise EngineError("stop strings must be non-empty")
        self._flush()
        if self.last_logits is None:
            raise EngineError(f"session {self.id!r} has no context: feed() something before generate()")
        tok = self.engine.tokenizer
        eos = set(tok.eos_token_ids) | set(self.engine.config.eos_token_ids)
        t0 = time.perf_counter()
        out: list[int] = []
        text, reason = "", "length"
        logits = self.last_logits
        for i in range(max_new_tokens):
            nxt = sampler(logits.float().cpu())
            if nxt in eos:
                reason = "eos"
                break
            out.append(nxt)
            if stops:
                text = tok.decode(out)
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    self._pending = [nxt]
                    break
            if i + 1 == max_new_tokens:
                self._pending = [nxt]
                break
            part = torch.tensor([nxt], dtype=torch.int64)
            logits = self.engine._forward([(self, part)], [False])[0]
            self.last_logits = logits
        if reason != "stop":
            text = tok.decode(out)
        return GenerateResult(text, out, reason, time.perf_counter() - t0)

    # -- chat -------------------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not messages and not generation_prompt:
            return ""
        return self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)

    def chat(self, role: str, content: str) -> FeedResult:
        """Append one chat message, rendered with the model's chat template (ChatML for SmolLM2)."""
        self._check_open()
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise EngineError(f"chat() needs a role and a content string, got {role!r}, {type(content).__name__}")
        before = self._render(self.messages, False)
        after = self._render([*self.messages, {"role": role, "content": content}], False)
        if not after.startswith(before) or after == before:
            raise EngineError("the chat template does not render this conversation incrementally")
        res = self.feed(after[len(before):])
        self.messages.append({"role": role, "content": content})
        return res

    def chat_reply(self, max_new_tokens: int = 256, **sampling: Any) -> GenerateResult:
        """The assistant's reply to the conversation so far; it joins the history (and the state)."""
        self._check_open()
        if not self.messages:
            raise EngineError("chat_reply() needs at least one chat() message first")
        closed = self._render(self.messages, False)
        prompt = self._render(self.messages, True)
        self.feed(prompt[len(closed):])
        g = self.generate(max_new_tokens, **sampling)
        reply = {"role": "assistant", "content": g.text}
        full = self._render([*self.messages, reply], False)
        fed = prompt + g.text
        if full.startswith(fed) and len(full) > len(fed):
            self.feed(full[len(fed):])  # the turn's closing tokens (e.g. "<|im_end|>\n")
        elif self.engine.tokenizer.eos_token_ids:
            self.feed([self.engine.tokenizer.eos_token_ids[0]])
        self.messages.append(reply)
        return g

    # -- state ------------------------------------------------------------------------------------
    def save(self) -> bytes:
        """Safetensors bytes (streamctx state format, versioned) that restore this session exactly."""
        self._check_open()
        self._flush()
        blob = self.engine.model.state_to_blob(self.state)
        if self.last_logits is not None:
            blob.tensors["last_logits"] = self.last_logits.contiguous()
        blob.meta.update(model=self.engine.fingerprint, policy=self.policy.config(), messages=self.messages)
        # What a bounded policy holds outside the cache (retrieval's host blocks, a memory).
        for name, t in getattr(self.policy, "state_tensors", dict)().items():
            blob.tensors[f"policy.{name}"] = t
        return blob.to_bytes()

    @classmethod
    def _restore(cls, engine: Engine, session_id: str, data: bytes) -> "Session":
        kind = f"{engine.model.kind}.session"
        try:
            blob = StateBlob.from_bytes(data, expect_kind=kind)
        except StateFormatError as exc:
            raise EngineError(f"cannot restore session {session_id!r}: {exc}") from None
        if blob.meta.get("model") != engine.fingerprint:
            raise EngineError(f"cannot restore session {session_id!r}: it was saved by a different model "
                              f"(fingerprint {blob.meta.get('model')!r}, this engine {engine.fingerprint!r})")
        s = cls(engine, session_id, policy=make_policy(blob.meta.get("policy", engine.policy_spec)))
        engine.model.free_state(s.state)
        try:
            s.state = engine.model.state_from_blob(blob)
        except (KeyError, ValueError) as exc:
            raise EngineError(f"cannot restore session {session_id!r}: {exc}") from None
        logits = blob.tensors.get("last_logits")
        s.last_logits = None if logits is None else logits.to(engine.model.device)
        pol_state = {k[len("policy."):]: t for k, t in blob.tensors.items() if k.startswith("policy.")}
        if pol_state or s.policy.bounded:
            try:
                getattr(s.policy, "load_state_tensors", lambda t: None)(pol_state)
            except (KeyError, ValueError) as exc:
                raise EngineError(f"cannot restore session {session_id!r}: policy state: {exc}") from None
            if hasattr(s.state, "policy"):
                s.state.policy = s.policy  # bound before the next forward, so its hooks see the first step
        s.messages = list(blob.meta.get("messages", []))
        return s

    def close(self) -> None:
        """Free the session's state (its KV blocks return to the pool) and forget it."""
        if self.closed:
            return
        self.engine.model.free_state(self.state)
        self.closed = True
        self.last_logits = None
        self._pending = []
        if self.engine.sessions.get(self.id) is self:
            del self.engine.sessions[self.id]

    def __repr__(self) -> str:
        return f"Session({self.id!r}, tokens={self.n_tokens}, closed={self.closed})"
