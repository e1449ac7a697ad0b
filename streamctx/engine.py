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
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, Sequence, TypeVar

import torch

from streamctx.model.config import LlamaConfig, MambaConfig, ModelConfig, ModelLoadError, config_to_dict
from streamctx.model.sampling import Sampler, SamplingParams
from streamctx.operators.policies import CachePolicy, make_policy
from streamctx.schedulers.step_scheduler import Demand, StepScheduler
from streamctx.state import StateBlob, StateFormatError

__all__ = ["Engine", "EngineError", "FeedResult", "GenerateResult", "Session", "Ticket"]

_R = TypeVar("_R")
# A session call as a generator: yields each model step it needs, `(ids [T], all_logits)`, is sent
# that step's logits (`[T, V]` or `[V]`) and returns the call's result.
Program = Generator[tuple[torch.Tensor, bool], torch.Tensor, _R]


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


@dataclass(frozen=True)
class _GenerateParams:
    """Checked generation arguments (checked when the call is made, not when it first runs)."""

    max_new_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...]

    @classmethod
    def check(cls, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
              seed: int | None = None, stop: str | Sequence[str] | None = None) -> "_GenerateParams":
        if max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        try:
            params = SamplingParams(temperature, top_p, top_k, seed)
            Sampler(params, device="cpu")
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not s for s in stops):
            raise EngineError("stop strings must be non-empty")
        return cls(max_new_tokens, params, stops)

    def sampler(self) -> Sampler:
        return Sampler(self.sampling, device="cpu")


@dataclass(eq=False)
class Ticket:
    """A submitted request (`Engine.submit`): filled in as the engine steps run it.

    feed: the input's `FeedResult` (None without input); generation: the `GenerateResult` of a
    requested generation; tokens: generated ids so far (grows step by step); error: the
    `EngineError` (or other exception) that ended the request, if any. Times are
    `time.perf_counter()` seconds: submitted, first generated token, finished.
    """

    session_id: str
    engine: "Engine" = field(repr=False)
    priority: int = 0
    feed: FeedResult | None = None
    generation: GenerateResult | None = None
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from submit to the first generated token (None before it)."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    def _on_token(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)

    def result(self) -> GenerateResult | FeedResult | None:
        """Step the engine until this request is done; its generation (else its feed), or raise its error."""
        while not self.done:
            if self.engine.idle:  # pragma: no cover - a queued ticket always leaves the engine busy
                raise EngineError(f"ticket for session {self.session_id!r} cannot finish: the engine is idle")
            self.engine.step()
        if self.error is not None:
            raise self.error
        return self.generation if self.generation is not None else self.feed


@dataclass(eq=False)
class _Job:
    """A ticket's program and the model step it waits for (`need`)."""

    ticket: Ticket
    session: "Session"
    program: Program[None] | None = None
    need: tuple[torch.Tensor, bool] | None = None
    start: Callable[[], Program[None]] | None = None


CPU_PREFILL_CHUNK = 512
CUDA_PREFILL_CHUNK = 4096


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
    """A loaded decoder with its tokenizer; creates and tracks sessions, and batches their work.

    Blocking calls (`Session.feed/generate/chat/chat_reply`) run one session at a time. Submitted
    work runs many sessions together (continuous batching): `submit` queues a request and returns
    a `Ticket`; each `step()` lets the `StepScheduler` pick which sessions' next model steps
    (decode tokens, prefill chunks) share one forward, under `step_tokens` tokens, `max_batch`
    sessions and an optional `memory_budget` (bytes of the stepped sessions' state); `step()`
    returns the tickets that finished. A session's requests run in submission order, and each runs
    the same code as the blocking call, with the same prefill chunks, so its tokens are those of
    the one-at-a-time run (logits equal within fp32 tolerance: batching changes reduction order).

    The dataflow model stage queues one Arrow batch's records, per session in turn order, and
    collects per-record results:

        tickets = []
        for rec in batch_records:                        # already in per-session turn order
            if rec["kind"] == "chat":                    # a chat message, then an optional reply
                tickets.append(engine.submit(rec["session"], rec["text"], role=rec["role"],
                                             generate=rec["reply"], max_new_tokens=64))
            else:                                        # a document chunk, then an optional greedy continuation
                tickets.append(engine.submit(rec["session"], rec["text"], generate=rec["reply"]))
        engine.run_until_idle()
        rows = [(t.generation.text if t.generation else None, repr(t.error) if t.error else None)
                for t in tickets]                        # one result (or error) per record, in record order
    """

    def __init__(self, model: Any, tokenizer: Any, *, policy: str | Mapping[str, Any] = "full",
                 prefill_chunk: int = 512, source: str = "", step_tokens: int | None = None,
                 max_batch: int = 64, memory_budget: int | None = None) -> None:
        if prefill_chunk < 1:
            raise EngineError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if max_batch < 1 or (step_tokens is not None and step_tokens < 1):
            raise EngineError(f"max_batch and step_tokens must be >= 1, got {max_batch}, {step_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.prefill_chunk = prefill_chunk
        self.source = source
        self.policy_spec = policy
        make_policy(policy)  # validate now: unknown names fail at load, not at first feed
        self.fingerprint = _fingerprint(self.config)
        self.sessions: dict[str, Session] = {}
        self.tiering: Any = None  # a streamctx.tiering.TieredSessions managing these sessions, if any
        # Default step budget: one full prefill chunk plus a decode token for every batch slot.
        self.scheduler = StepScheduler(step_tokens or prefill_chunk + max_batch, max_sessions=max_batch,
                                       prefill_chunk=prefill_chunk, memory_budget=memory_budget)
        self._queues: dict[str, deque[_Job]] = {}  # per session: its submitted jobs, the running one first
        pool = getattr(model, "pool", None)
        self._bytes_per_token = 0 if pool is None else pool.block_nbytes() * pool.num_layers // pool.block_size

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str], *, policy: str | Mapping[str, Any] = "full",
             dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
             prefill_chunk: int | None = None, block_size: int = 64,
             cache_dir: str | os.PathLike[str] | None = None, step_tokens: int | None = None,
             max_batch: int = 64, memory_budget: int | None = None) -> "Engine":
        """Load "smollm2", a .gguf file or a Hugging Face folder (weights via the loader only).

        dtype: default fp32 on CPU, bf16 on CUDA. policy: a KV policy name or dict (`"full"`).
        prefill_chunk: long feeds are processed in chunks of this many tokens; default 512 on CPU
        (GEMM-bound: larger chunks gain nothing) and 4096 on CUDA (a chunk's cost there is mostly
        kernel launches, so fewer chunks are faster).
        step_tokens, max_batch, memory_budget: the batching budgets of `step()` (class docstring).
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
        if prefill_chunk is None:
            prefill_chunk = CUDA_PREFILL_CHUNK if dev.type == "cuda" else CPU_PREFILL_CHUNK
        return cls(model, ckpt.tokenizer, policy=policy, prefill_chunk=prefill_chunk, source=ckpt.source,
                   step_tokens=step_tokens, max_batch=max_batch, memory_budget=memory_budget)

    # -- sessions ---------------------------------------------------------------------------------
    def session(self, session_id: str, *, state: bytes | None = None,
                policy: str | Mapping[str, Any] | None = None) -> "Session":
        """The live session `session_id`, or a new one (restored from `state` bytes if given).

        policy: a KV policy for a new session other than the engine's (sessions of one engine may
        differ); a restored session keeps the policy it was saved with.
        """
        if not isinstance(session_id, str) or not session_id:
            raise EngineError(f"session id must be a non-empty string, got {session_id!r}")
        live = self.sessions.get(session_id)
        if live is not None:
            if state is not None:
                raise EngineError(f"session {session_id!r} is live; close it before restoring state into it")
            return live
        if state is None:
            s = Session(self, session_id, policy=None if policy is None else make_policy(policy))
        else:
            s = Session._restore(self, session_id, state)
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

    # -- submitted work (continuous batching) ----------------------------------------------------
    def submit(self, session_id: str, text_or_ids: str | Sequence[int] | torch.Tensor | None = None, *,
               role: str | None = None, generate: bool = False, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, return_logits: bool = False,
               priority: int = 0) -> Ticket:
        """Queue one request for `session_id` (created if new); it runs in later `step()` calls.

        Without `role`: feed `text_or_ids` (if given; `return_logits` as in `feed`), then, with
        `generate=True`, `generate(max_new_tokens, ...)`. With `role`: `chat(role, text)`, then,
        with `generate=True`, `chat_reply(max_new_tokens, ...)`. Arguments are checked now (an
        `EngineError` raises here); errors found while running end the ticket (`ticket.error`).
        """
        session = self.session(session_id)
        session._check_open()
        params = _GenerateParams.check(max_new_tokens, temperature, top_p, top_k, seed, stop)
        if role is not None and not isinstance(text_or_ids, str):
            raise EngineError(f"a chat message (role={role!r}) needs text content, got {type(text_or_ids).__name__}")
        ids = None if role is not None or text_or_ids is None else self._ids(text_or_ids)
        if role is None and ids is None and not generate:
            raise EngineError("submit() needs text_or_ids, generate=True, or both")
        ticket = Ticket(session_id, self, priority)

        def program() -> Program[None]:
            if role is not None:
                ticket.feed = yield from session._chat_program(role, text_or_ids)  # type: ignore[arg-type]
                if generate:
                    ticket.generation = yield from session._chat_reply_program(params, ticket._on_token)
                return
            if ids is not None:
                ticket.feed = FeedResult(len(ids), (yield from session._feed_program(ids, return_logits)))
            if generate:
                ticket.generation = yield from session._generate_program(params, ticket._on_token)

        self._queues.setdefault(session_id, deque()).append(_Job(ticket, session, start=program))
        return ticket

    def _has_work(self, session_id: str) -> bool:
        return bool(self._queues.get(session_id))

    @property
    def idle(self) -> bool:
        """True when no submitted work is waiting."""
        return not self._queues

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        t = job.ticket
        t.error, t.done, t.finished_at = error, True, time.perf_counter()
        queue = self._queues[t.session_id]
        queue.popleft()
        if not queue:
            del self._queues[t.session_id]

    def _cancel(self, session_id: str, reason: str) -> None:
        """End every submitted job of `session_id` with an `EngineError(reason)`."""
        for job in self._queues.pop(session_id, ()):
            job.ticket.error, job.ticket.done, job.ticket.finished_at = EngineError(reason), True, time.perf_counter()
            if job.program is not None:
                job.program.close()

    def _advance(self, job: _Job, logits: torch.Tensor | None, finished: list[Ticket]) -> None:
        """Start (logits None) or resume a job's program up to its next model step or its end."""
        try:
            if job.program is None:
                assert job.start is not None
                job.program = job.start()
                job.need = next(job.program)
            else:
                job.need = job.program.send(logits)  # type: ignore[arg-type]
        except StopIteration:
            self._finish(job)
            finished.append(job.ticket)
        except Exception as exc:  # the request fails alone; the session and the stream go on
            self._finish(job, exc)
            finished.append(job.ticket)

    def step(self) -> list[Ticket]:
        """Run one scheduled model step over the sessions with submitted work; the tickets it finished."""
        finished: list[Ticket] = []
        ready: dict[str, _Job] = {}
        for sid in list(self._queues):
            while sid in self._queues:  # start jobs until one needs the model (or the queue empties)
                job = self._queues[sid][0]
                if job.program is None:
                    self._advance(job, None, finished)
                    continue
                ready[sid] = job
                break
        if not ready:
            return finished
        demands = []
        for sid, job in ready.items():
            assert job.need is not None
            n = int(job.need[0].shape[0])
            state_bytes = self.model.state_nbytes(job.session.state)
            demands.append(Demand(sid, prefill=0 if n == 1 else n, decode=n == 1, priority=job.ticket.priority,
                                  split=False, state_bytes=state_bytes, bytes_per_token=self._bytes_per_token))
        grants = self.scheduler.step(demands)
        jobs = [ready[g.session_id] for g in grants]
        batch = [(j.session, j.need[0]) for j in jobs]  # type: ignore[index]
        try:
            outs = self._forward(batch, [j.need[1] for j in jobs])  # type: ignore[index]
        except Exception as exc:  # a failed forward fails the requests in it, not the engine
            for j in jobs:
                self._finish(j, exc)
                finished.append(j.ticket)
            return finished
        for j, out in zip(jobs, outs):
            self._advance(j, out, finished)
        return finished

    def run_until_idle(self, max_steps: int | None = None) -> list[Ticket]:
        """Step until no submitted work is left (or `max_steps`); every ticket finished, in order."""
        finished: list[Ticket] = []
        steps = 0
        while self._queues and (max_steps is None or steps < max_steps):
            finished += self.step()
            steps += 1
        return finished

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
        """Live sessions, state bytes, for paged models block usage of the KV pool, and under a
        `TieredSessions` (streamctx.tiering) its tier stats as `tiering`."""
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
        if self.tiering is not None:  # bytes per tier, spills, restores, prefetch hit rate, stall time
            out["tiering"] = self.tiering.stats()
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

    def _check_idle(self) -> None:
        """Blocking calls need the session open and free of submitted work (it would interleave)."""
        self._check_open()
        if self.engine._has_work(self.id):
            raise EngineError(f"session {self.id!r} has submitted work in flight: run engine.step() / "
                              f"run_until_idle() (or ticket.result()) before calling it directly")

    # -- feeding ----------------------------------------------------------------------------------
    def feed(self, text_or_ids: str | Sequence[int] | torch.Tensor, *, return_logits: bool = False) -> FeedResult:
        """Append text (tokenized without BOS) or token ids; logits `[T, V]` of those tokens if asked."""
        self._check_idle()
        ids = self.engine._ids(text_or_ids)
        return FeedResult(len(ids), self._drive(self._feed_program(ids, return_logits)))

    # A *program* is a generator holding one call's logic: it yields each model step it needs as
    # `(ids [T], all_logits)` and is sent that step's logits. The blocking methods drive it alone
    # (`_drive`); `Engine.step` drives many sessions' programs in one batched forward. Both run
    # the same code, so both make the same sequence of forwards per session.
    def _drive(self, program: Program[_R]) -> _R:
        try:
            ids, flag = next(program)
            while True:
                ids, flag = program.send(self.engine._forward([(self, ids)], [flag])[0])
        except StopIteration as stop:
            return stop.value

    def _feed_program(self, ids: list[int], return_logits: bool) -> Program[torch.Tensor | None]:
        pending, self._pending = self._pending, []
        full = pending + ids
        chunk = self.engine.prefill_chunk
        parts: list[torch.Tensor] = []
        for a in range(0, len(full), chunk):
            out = yield torch.tensor(full[a:a + chunk], dtype=torch.int64), return_logits
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
            self._drive(self._feed_program([], False))

    # -- generation -------------------------------------------------------------------------------
    def generate(self, max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None) -> GenerateResult:
        """Continue from what was fed: greedy at temperature 0, else seeded top-k/top-p sampling.

        Stops at an EOS token (not fed, not returned), at a `stop` string (text cut before it;
        its tokens stay in token_ids and in the session), or after max_new_tokens.
        """
        self._check_idle()
        params = _GenerateParams.check(max_new_tokens, temperature, top_p, top_k, seed, stop)
        return self._drive(self._generate_program(params))

    def _generate_program(self, p: "_GenerateParams",
                          on_token: Callable[[int], None] | None = None) -> Program[GenerateResult]:
        sampler = p.sampler()
        yield from self._feed_program([], False)  # the pending token of the previous generation
        if self.last_logits is None:
            raise EngineError(f"session {self.id!r} has no context: feed() something before generate()")
        tok = self.engine.tokenizer
        eos = set(tok.eos_token_ids) | set(self.engine.config.eos_token_ids)
        t0 = time.perf_counter()
        out: list[int] = []
        text, reason = "", "length"
        logits = self.last_logits
        for i in range(p.max_new_tokens):
            nxt = sampler(logits.float().cpu())
            if nxt in eos:
                reason = "eos"
                break
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if p.stops:
                text = tok.decode(out)
                cut = min((text.find(s) for s in p.stops if s in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    self._pending = [nxt]
                    break
            if i + 1 == p.max_new_tokens:
                self._pending = [nxt]
                break
            logits = yield torch.tensor([nxt], dtype=torch.int64), False
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
        self._check_idle()
        return self._drive(self._chat_program(role, content))

    def _chat_program(self, role: str, content: str) -> Program[FeedResult]:
        self._check_open()
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise EngineError(f"chat() needs a role and a content string, got {role!r}, {type(content).__name__}")
        before = self._render(self.messages, False)
        after = self._render([*self.messages, {"role": role, "content": content}], False)
        if not after.startswith(before) or after == before:
            raise EngineError("the chat template does not render this conversation incrementally")
        ids = self.engine._ids(after[len(before):])
        yield from self._feed_program(ids, False)
        self.messages.append({"role": role, "content": content})
        return FeedResult(len(ids))

    def chat_reply(self, max_new_tokens: int = 256, **sampling: Any) -> GenerateResult:
        """The assistant's reply to the conversation so far; it joins the history (and the state)."""
        self._check_idle()
        return self._drive(self._chat_reply_program(_GenerateParams.check(max_new_tokens, **sampling)))

    def _chat_reply_program(self, p: "_GenerateParams",
                            on_token: Callable[[int], None] | None = None) -> Program[GenerateResult]:
        self._check_open()
        if not self.messages:
            raise EngineError("chat_reply() needs at least one chat() message first")
        closed = self._render(self.messages, False)
        prompt = self._render(self.messages, True)
        yield from self._feed_program(self.engine._ids(prompt[len(closed):]), False)
        g = yield from self._generate_program(p, on_token)
        reply = {"role": "assistant", "content": g.text}
        full = self._render([*self.messages, reply], False)
        fed = prompt + g.text
        if full.startswith(fed) and len(full) > len(fed):
            # the turn's closing tokens (e.g. "<|im_end|>\n")
            yield from self._feed_program(self.engine._ids(full[len(fed):]), False)
        elif self.engine.tokenizer.eos_token_ids:
            yield from self._feed_program([self.engine.tokenizer.eos_token_ids[0]], False)
        self.messages.append(reply)
        return g

    # -- state ------------------------------------------------------------------------------------
    def save(self) -> bytes:
        """Safetensors bytes (streamctx state format, versioned) that restore this session exactly."""
        self._check_idle()
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
        self.engine._cancel(self.id, f"session {self.id!r} was closed with this request unfinished")
        self.engine.model.free_state(self.state)
        self.closed = True
        self.last_logits = None
        self._pending = []
        if self.engine.sessions.get(self.id) is self:
            del self.engine.sessions[self.id]

    def __repr__(self) -> str:
        return f"Session({self.id!r}, tokens={self.n_tokens}, closed={self.closed})"
