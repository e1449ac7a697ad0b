"""The model stage: one `Engine` per replica and one engine `Session` per session id.

For each record, in order: chat roles (user/assistant/system) are appended with the model's chat
template, `document` text is fed as is. With `generate`, a chat record gets the assistant's reply
(greedy, through the chat template) and a document record a plain continuation of its text. A batch's
records are submitted to the engine together and run with continuous batching (`Engine.submit` /
`step`): the sessions' prefill chunks and decode steps share forwards, each session's records
still run in turn order, and the results are those of one-at-a-time runs. A record the engine
rejects is dead-lettered alone; the batch goes on. Sessions are closed (KV blocks back to
the pool) when the host ends them: `end` record, idle TTL, or end of stream.

Under `scheduler.memory` the sessions are tiered (`streamctx.tiering`), with an optional peer tier of
state stores on other nodes (`peer_budget`). A spilled state that is lost with its node raises
`StateLostError` out of the stage (not dead-lettered): the runtime restores every replica from the
last checkpoint and replays, as for a crashed actor.
"""

from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa

from streamctx.dataflow.records import dead_row

OUTPUT_SCHEMA = pa.schema([
    pa.field("session_id", pa.string()),
    pa.field("turn", pa.int64()),
    pa.field("reply", pa.string()),
    pa.field("reply_tokens", pa.int64()),
    pa.field("n_context_tokens", pa.int64()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("latency_ms", pa.float64()),
    pa.field("policy", pa.string()),
    pa.field("evicted_tokens", pa.int64()),
    pa.field("state_bytes", pa.int64()),
    # Carried for downstream stages and the sink (lifecycle and replay columns).
    pa.field("end", pa.bool_()),
    pa.field("_offset", pa.int64()),
    pa.field("_seq", pa.int64()),
    pa.field("_fresh", pa.bool_()),
])


class ModelStage:
    name = "model"

    def __init__(self, model: dict[str, Any], policy: dict[str, Any], base_dir: str,
                 part: int = 0, parts: int = 1, memory: Optional[dict[str, Any]] = None) -> None:
        from pathlib import Path

        from streamctx.engine import Engine

        if parts != 1:  # build_model_stage gives a split model to PipelinedModelStage
            raise ValueError(f"ModelStage runs the whole model (parts=1), got parts={parts}")
        src = model["path"] or model["name"]
        if model["path"]:
            p = Path(model["path"]).expanduser()
            src = str(p if p.is_absolute() else Path(base_dir) / p)
        self.source = src
        device = None if model["device"] in (None, "auto") else model["device"]
        self.engine = Engine.load(src, policy=engine_policy(policy), dtype=model["dtype"], device=device)
        self.policy_name = str(policy.get("type") or policy.get("preset"))
        self.default_max_new = int(model["max_new_tokens"])
        self.tiered: Any = None  # TieredSessions when the job sets scheduler.memory.device_budget
        if memory and memory.get("device_budget") is not None:
            from streamctx.tiering import tiered_sessions

            spill = memory.get("spill_dir")
            if spill is not None:
                root = Path(spill) if Path(spill).is_absolute() else Path(base_dir) / spill
                root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the tier makes a private folder inside
                spill = str(root)
            peer = memory.get("peer_budget")
            self.tiered = tiered_sessions(self.engine, int(memory["device_budget"]),
                                          host_budget=memory.get("host_budget"), spill_dir=spill,
                                          peer_budget=None if peer is None else int(peer),
                                          peer_stores=int(memory.get("peer_stores") or 1),
                                          max_live=int(memory.get("max_live_sessions") or 8))

    def process_dead(self, batch: pa.RecordBatch) -> tuple[Optional[pa.RecordBatch], list[dict[str, Any]]]:
        """Run a batch's records through the engine together (continuous batching across its
        sessions; each session's records in turn order) and return one output row per record, in
        record order, plus dead-letter rows for the records the engine rejected."""
        cols = {n: batch.column(n).to_pylist() for n in
                ("session_id", "turn", "role", "text", "generate", "max_new_tokens", "end", "_offset", "_seq", "_fresh")
                if n in batch.schema.names}
        n = batch.num_rows
        fresh = cols.get("_fresh", [False] * n)
        done: dict[int, tuple[Any, dict[str, Any]]] = {}  # record index -> (ticket, stats when it finished)
        dead: list[dict[str, Any]] = []
        groups = self._session_groups(cols["session_id"])
        for k, group in enumerate(groups):
            if self.tiered is not None:
                for sid in group:  # live in the engine (restored from its tier if it was spilled)
                    self.tiered.session(sid)
                if k + 1 < len(groups):  # the next group's states move toward the device meanwhile
                    self.tiered.hint_upcoming(sorted(groups[k + 1]))
            self._run_records(cols, [i for i in range(n) if cols["session_id"][i] in group], done, dead)
        rows: dict[str, list[Any]] = {f.name: [] for f in OUTPUT_SCHEMA}
        for i in sorted(done):
            t, stats = done[i]
            sid, turn = cols["session_id"][i], cols["turn"][i]
            if t.error is not None:  # engine errors (and any other) dead-letter this record only
                dead.append(dead_row(cols["_offset"][i], f"model: {type(t.error).__name__}: {t.error}",
                                     stage="model", session_id=sid, turn=turn))
                continue
            g = t.generation
            for k2, v in (("session_id", sid), ("turn", turn), ("reply", None if g is None else g.text),
                          ("reply_tokens", None if g is None else len(g.token_ids)),
                          ("latency_ms", (t.finished_at - t.submitted_at) * 1e3), ("policy", self.policy_name),
                          *stats.items(),
                          ("end", cols["end"][i]), ("_offset", cols["_offset"][i]), ("_seq", cols["_seq"][i]),
                          ("_fresh", fresh[i])):
                rows[k2].append(v)
        if not rows["session_id"]:
            return None, dead
        return pa.RecordBatch.from_pydict(rows, schema=OUTPUT_SCHEMA), dead

    def _session_groups(self, session_ids: list[str]) -> list[set[str]]:
        """The batch's sessions in order of first appearance: one group, or groups of at most
        `max_live_sessions` when state is tiered (a group's sessions are live together)."""
        order = list(dict.fromkeys(session_ids))
        size = len(order) if self.tiered is None else self.tiered.max_live
        return [set(order[j:j + size]) for j in range(0, len(order), max(size, 1))]

    def _run_records(self, cols: dict[str, list[Any]], indexes: list[int],
                     done: dict[int, tuple[Any, dict[str, Any]]], dead: list[dict[str, Any]]) -> None:
        """Submit the records `indexes` (in order) and step the engine until they are all done."""
        tickets: dict[Any, int] = {}  # ticket -> record index
        for i in indexes:
            sid, role = cols["session_id"][i], cols["role"][i]
            gen = bool(cols["generate"][i])
            max_new = cols["max_new_tokens"][i] or self.default_max_new
            try:
                t = (self.engine.submit(sid, cols["text"][i], generate=gen, max_new_tokens=max_new)
                     if role == "document" else
                     self.engine.submit(sid, cols["text"][i], role=role, generate=gen, max_new_tokens=max_new))
            except Exception as exc:  # rejected at submit (bad argument): this record only
                dead.append(dead_row(cols["_offset"][i], f"model: {type(exc).__name__}: {exc}",
                                     stage="model", session_id=sid, turn=cols["turn"][i]))
                continue
            tickets[t] = i
        while not self.engine.idle:
            for t in self.engine.step():
                done[tickets[t]] = (t, self._session_stats(t.session_id))

    def _session_stats(self, session_id: str) -> dict[str, int]:
        """The session's context numbers right after one of its requests finished."""
        s = self.engine.sessions.get(session_id)
        if s is None:  # closed by a failed request; its row is dead-lettered anyway
            return {}
        cached = _cached_tokens(s)
        return {"n_context_tokens": s.n_tokens, "cached_tokens": cached, "evicted_tokens": s.n_tokens - cached,
                "state_bytes": self.engine.model.state_nbytes(s.state)}

    def process(self, batch: pa.RecordBatch) -> Optional[pa.RecordBatch]:
        return self.process_dead(batch)[0]

    def end_session(self, session_id: str) -> None:
        if self.tiered is not None:
            self.tiered.close(session_id)  # live state and any spilled copy
            return
        s = self.engine.sessions.get(session_id)
        if s is not None:
            s.close()

    def session_bytes(self) -> dict[str, int]:
        """State bytes per session: live in the engine, or spilled to a tier."""
        if self.tiered is not None:
            return self.tiered.session_nbytes()
        m = self.engine.model
        return {sid: m.state_nbytes(s.state) for sid, s in self.engine.sessions.items()}

    def tier_stats(self) -> Optional[dict[str, Any]]:
        """Bytes per tier, spills, restores, prefetch hit rate, stall time (None: not tiered)."""
        return None if self.tiered is None else self.tiered.stats()

    def close(self) -> None:
        if self.tiered is not None:
            for sid in self.tiered.session_ids():
                self.tiered.close(sid)
            self.tiered.close_tiers()
        for s in list(self.engine.sessions.values()):
            s.close()

    def snapshot(self) -> dict[str, bytes]:
        """Every session's state (`Session.save()`: versioned safetensors bytes), live or spilled."""
        if self.tiered is not None:
            return self.tiered.snapshot()
        return {sid: s.save() for sid, s in self.engine.sessions.items()}

    def restore(self, blobs: dict[str, bytes]) -> None:
        """Drop every session, then restore `blobs` (bit-exact: `engine.session(sid, state=...)`;
        tiered: admitted as spilled sessions, restored on first use)."""
        if self.tiered is not None:
            self.tiered.restore(blobs)
            return
        self.close()
        for sid, data in blobs.items():
            self.engine.session(sid, state=data)


def engine_policy(policy: dict[str, Any]) -> str | dict[str, Any]:
    """The spec's policy section in the engine's terms: `{type: X, ...}` -> `{name: X, ...}`;
    `{preset: P}` -> the name `P` (the engine rejects names it does not know)."""
    if "preset" in policy:
        return str(policy["preset"])
    params = {k: v for k, v in policy.items() if k != "type"}
    return {"name": policy["type"], **params}


def _cached_tokens(session: Any) -> int:
    """Tokens held in the session's KV cache (after its policy); the fed count for recurrent state."""
    layers = getattr(session.state, "layers", None)
    if layers:
        return int(layers[0].length)
    return int(session.n_tokens)


def build_model_stage(**payload: Any) -> ModelStage:
    if payload.get("parts", 1) > 1:  # model.stages > 1: layers split over actors
        from streamctx.dataflow.pipeline_stage import PipelinedModelStage

        memory = payload.pop("memory", None)
        if memory and memory.get("device_budget") is not None:
            raise ValueError("scheduler.memory.device_budget (tiered session state) needs model.stages: 1")
        return PipelinedModelStage(**payload)
    return ModelStage(**payload)
