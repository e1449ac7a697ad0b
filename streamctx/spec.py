"""Job specs: the pydantic v2 boundary of a streaming job (DESIGN.md contract 6).

A `JobSpec` is read from YAML or JSON (`JobSpec.from_file`) or built in Python. Every section
forbids unknown keys, so a typo is an error naming its field. Relative paths resolve against the
spec file's folder (`base_dir`); outputs must stay inside it. `validate(path)` reports every
error at once, each with its field path (`source.path: file not found: convs.jsonl`).

Input records (one JSONL line, or one row of an Arrow/Parquet table) are `InputRecord`s; the
runtime dead-letters anything that does not validate and keeps running.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

ROLES = ("user", "assistant", "system", "document")
INT64_MAX = 2**63 - 1  # records travel as Arrow int64 columns
Role = Literal["user", "assistant", "system", "document"]


# Upper bounds on counts and sizes: a typo like `replicas: 10000000` is an error naming the field,
# not a cluster asked for ten million actors. Floats must be finite everywhere (`allow_inf_nan`).
MAX_ACTORS = 1024
MAX_SECONDS = 7 * 24 * 3600.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False, strict=True)


# --- input records -------------------------------------------------------------------------------


class InputRecord(BaseModel):
    """One turn of one session.

    `generate`: reply after this turn. `end`: the session is over; its state is freed.
    Extra fields are kept and travel with the record (user stages may read them).
    """

    model_config = ConfigDict(extra="allow", strict=True)

    session_id: str = Field(min_length=1)
    turn: int = Field(ge=0, le=INT64_MAX)
    role: Role
    text: str
    generate: bool = False
    max_new_tokens: Optional[int] = Field(default=None, ge=1, le=INT64_MAX)
    end: bool = False


# --- job sections --------------------------------------------------------------------------------

Resource = Annotated[float, Field(ge=0, le=1 << 30)]  # a Ray resource amount

SourceType = Literal["jsonl", "parquet", "arrow", "iterator", "queue"]
SinkType = Literal["parquet", "jsonl", "memory", "callback"]


class SourceSpec(_Section):
    """Where records come from.

    jsonl/parquet/arrow read `path`; `follow` (jsonl only) tails the file until it has been idle
    for `follow_idle_s`. iterator/queue take a Python object (`obj`: an iterable of dicts or
    Arrow batches, or a `queue.Queue` ended by `None`) and exist only for specs built in Python.
    `start_offset` replays from a recorded offset (see `JobResult.last_offset`).
    """

    type: SourceType
    path: Optional[str] = None
    follow: bool = False
    follow_idle_s: float = Field(default=2.0, gt=0, le=MAX_SECONDS)
    poll_interval_s: float = Field(default=0.05, gt=0, le=3600)
    start_offset: int = Field(default=0, ge=0, le=INT64_MAX)
    obj: Any = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _check(self) -> "SourceSpec":
        if self.type in ("jsonl", "parquet", "arrow") and not self.path:
            raise ValueError(f"source type {self.type!r} needs a path")
        if self.type in ("iterator", "queue") and self.obj is None:
            raise ValueError(f"source type {self.type!r} needs `obj` (only available from Python)")
        if self.follow and self.type != "jsonl":
            raise ValueError("follow is only supported for jsonl sources")
        return self


class ModelSpec(_Section):
    """The model stage. `name` is a known model ("smollm2") unless `path` (HF folder or GGUF) is given.

    `stages`: split the layers over this many actors (pipeline); outputs equal one stage.
    `replicas`: model-stage replicas (defaults to `runner.replicas`).
    Placement (Ray custom resources): `resources` for every actor, or `replica_resources` (one
    entry per replica), or `stage_resources` (one entry per layer stage).
    """

    name: Optional[str] = "smollm2"
    path: Optional[str] = None
    dtype: Optional[str] = None
    device: str = "auto"
    stages: int = Field(default=1, ge=1, le=MAX_ACTORS)
    replicas: Optional[int] = Field(default=None, ge=1, le=MAX_ACTORS)
    max_new_tokens: int = Field(default=64, ge=1, le=1 << 20)
    num_cpus: float = Field(default=1.0, ge=0, le=1 << 16)
    resources: dict[str, Resource] = Field(default_factory=dict)
    replica_resources: list[dict[str, Resource]] = Field(default_factory=list, max_length=MAX_ACTORS)
    stage_resources: list[dict[str, Resource]] = Field(default_factory=list, max_length=MAX_ACTORS)

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.replica_resources and self.replicas is not None and len(self.replica_resources) != self.replicas:
            raise ValueError(f"replica_resources has {len(self.replica_resources)} entries for {self.replicas} replicas")
        if not self.name and not self.path:
            raise ValueError("model needs a name or a path")
        if self.stage_resources and len(self.stage_resources) != self.stages:
            raise ValueError(f"stage_resources has {len(self.stage_resources)} entries for {self.stages} stages")
        return self


class WindowsSpec(_Section):
    adaptive: bool = False


class MemorySpec(_Section):
    """Where the model stage keeps session state (streamctx.tiering). Without `device_budget`
    every session stays live in the engine. With it, at most `max_live_sessions` per replica are
    live; the others are snapshots that the memory-budget scheduler places on the device tier (up
    to `device_budget` bytes), the host tier (`host_budget`; unbounded when unset), the peer tier,
    then disk (a private folder under `spill_dir`, default the system temp folder; a relative path
    is taken from the spec's folder and may not leave it). Sizes are bytes or strings like "512MiB".

    Peer tier (`peer_budget`, needs `host_budget`): up to `peer_budget` bytes per model replica in
    `peer_stores` (default 1) state-store actors, each of `peer_budget / peer_stores` bytes, spread
    over the Ray nodes other than the replica's own. On a single node (or the local runner) the
    peer tier is left out with a logged reason and host spills to disk. If a node holding peer
    state is lost, the job restores every replica from the last checkpoint and replays
    (`checkpoint.enabled`; without checkpoints the job fails with `StateLostError`), and lost stores
    are replaced on the surviving nodes."""

    device_budget: Optional[ByteSize] = None
    host_budget: Optional[ByteSize] = None
    peer_budget: Optional[ByteSize] = None
    peer_stores: Optional[int] = Field(default=None, ge=1, le=MAX_ACTORS)
    spill_dir: Optional[str] = None
    max_live_sessions: int = Field(default=8, ge=1, le=65536)

    @model_validator(mode="after")
    def _check(self) -> "MemorySpec":
        if self.peer_stores is not None and self.peer_budget is None:
            raise ValueError("peer_stores needs peer_budget (the peer tier's bytes per model replica)")
        if self.peer_budget is not None:
            if self.device_budget is None or self.host_budget is None:
                raise ValueError("peer_budget needs device_budget and host_budget: sessions reach the peer "
                                 "tier only when a bounded host tier spills")
            if self.peer_budget < (self.peer_stores or 1):
                raise ValueError(f"peer_budget of {int(self.peer_budget)} bytes is less than one byte per "
                                 f"store ({self.peer_stores or 1} peer_stores)")
        return self


class SchedulerSpec(_Section):
    windows: WindowsSpec = Field(default_factory=WindowsSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)


class RunnerSpec(_Section):
    """How the graph runs.

    `key_groups`: fixed number of routing groups (a session's group never changes; replicas own
    whole groups). `batch_size`: records per Arrow batch read from the source.
    `max_in_flight`: records between the source and the sink at any moment (every edge included).
    `start_timeout_s`: how long Ray may take to place the stage actors (and load their models).
    """

    type: Literal["local", "ray"] = "ray"
    address: Optional[str] = None
    replicas: int = Field(default=1, ge=1, le=MAX_ACTORS)
    key_groups: int = Field(default=128, ge=1, le=1 << 16)
    batch_size: int = Field(default=64, ge=1, le=1 << 20)
    max_in_flight: int = Field(default=1024, ge=1, le=1 << 30)
    start_timeout_s: float = Field(default=300.0, gt=0, le=MAX_SECONDS)


class SinkSpec(_Section):
    """Where outputs go. File sinks write `part-NNNNN.<ext>` under `path` (and `dead_letter/`
    under it) with atomic commits every `rows_per_file` rows; `callback` takes `fn(batch)`."""

    type: SinkType = "memory"
    path: Optional[str] = None
    rows_per_file: int = Field(default=10_000, ge=1, le=1 << 31)
    fn: Optional[Callable[..., Any]] = Field(default=None, exclude=True, repr=False)
    dead_letter_fn: Optional[Callable[..., Any]] = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _check(self) -> "SinkSpec":
        if self.type in ("parquet", "jsonl") and not self.path:
            raise ValueError(f"sink type {self.type!r} needs a path")
        if self.type == "callback" and self.fn is None:
            raise ValueError("sink type 'callback' needs `fn` (only available from Python)")
        return self


class SessionsSpec(_Section):
    """Session lifecycle. A session idle for more than `idle_ttl_records` stream records (a logical
    clock: deterministic on every runner) or `idle_ttl_s` seconds (wall clock) is ended."""

    idle_ttl_records: Optional[int] = Field(default=None, ge=1, le=INT64_MAX)
    idle_ttl_s: Optional[float] = Field(default=None, gt=0, le=MAX_SECONDS)


class StageSpec(_Section):
    """A user stage: a class with `process(batch: pa.RecordBatch) -> pa.RecordBatch | None`.

    `cls` is `"package.module:Class"` (imported, never evaluated) or the class itself.
    `place`: before or after the model stage. Optional hooks: `end_session(session_id)`,
    `session_bytes() -> dict[str, int]`, `close()`.
    """

    name: str = Field(min_length=1)
    cls: Union[str, type]
    kwargs: dict[str, Any] = Field(default_factory=dict)
    replicas: Optional[int] = Field(default=None, ge=1, le=MAX_ACTORS)
    place: Literal["pre_model", "post_model"] = "pre_model"
    num_cpus: float = Field(default=0.0, ge=0, le=1 << 16)
    resources: dict[str, Resource] = Field(default_factory=dict)
    replica_resources: list[dict[str, Resource]] = Field(default_factory=list, max_length=MAX_ACTORS)

    @field_validator("cls")
    @classmethod
    def _cls_shape(cls, v: Union[str, type]) -> Union[str, type]:
        if isinstance(v, str) and (":" not in v or not all(v.split(":", 1))):
            raise ValueError(f"expected 'package.module:Class', got {v!r}")
        return v


class CheckpointSpec(_Section):
    """Session-state checkpoints (aligned barriers) and exactly-once recovery.

    With `enabled`, a barrier follows every `interval_records` source records (and every
    `interval_s` seconds, if set); each stage replica then writes its sessions' state and, once the
    records before the barrier are committed to the sink, a manifest completes the checkpoint. A lost
    stage actor or node is recovered from the last checkpoint (at most `max_recoveries` times per
    run); `streamctx run --resume` continues a killed job. `path`: a folder inside the spec's folder
    (default `checkpoints/<job name>`) or a filesystem URI (`s3://bucket/prefix`, `file:///abs/dir`);
    `filesystem` (Python only): a `pyarrow.fs.FileSystem` that `path` lies in. `keep`: complete
    checkpoints kept.
    """

    enabled: bool = False
    interval_records: int = Field(default=10_000, ge=1)
    interval_s: Optional[float] = Field(default=None, gt=0)
    path: Optional[str] = Field(default=None, min_length=1)
    keep: int = Field(default=2, ge=1)
    max_recoveries: int = Field(default=100, ge=0)
    filesystem: Any = Field(default=None, exclude=True, repr=False)


class JobSpec(_Section):
    name: str = Field(min_length=1, max_length=200)
    source: SourceSpec
    model: Optional[ModelSpec] = Field(default_factory=ModelSpec)
    policy: dict[str, Any] = Field(default_factory=lambda: {"type": "full"})
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    runner: RunnerSpec = Field(default_factory=RunnerSpec)
    sink: SinkSpec = Field(default_factory=SinkSpec)
    sessions: SessionsSpec = Field(default_factory=SessionsSpec)
    stages: list[StageSpec] = Field(default_factory=list, max_length=256)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    base_dir: str = Field(default_factory=os.getcwd, exclude=True)

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, v: str) -> str:
        # The name becomes part of paths (default checkpoint folder) and Ray job names.
        if v in (".", "..") or any(c in v for c in "/\\") or not v.isprintable() or not v.strip():
            raise ValueError(f"name must be printable, not blank and free of path separators, got {v!r}")
        return v

    @field_validator("policy")
    @classmethod
    def _policy_shape(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Only the shape is checked here; the engine rejects unknown policy names.
        has_type, has_preset = "type" in v, "preset" in v
        if has_type == has_preset:
            raise ValueError("policy needs exactly one of `type` or `preset`")
        key = "type" if has_type else "preset"
        if not isinstance(v[key], str) or not v[key]:
            raise ValueError(f"policy.{key} must be a non-empty string")
        if has_preset and len(v) > 1:
            raise ValueError("policy.preset takes no other keys")
        return v

    @model_validator(mode="after")
    def _names_unique(self) -> "JobSpec":
        names = [s.name for s in self.stages]
        reserved = {"source", "segment", "model", "sink"}
        for n in names:
            if n in reserved:
                raise ValueError(f"stage name {n!r} is reserved")
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    # --- paths -----------------------------------------------------------------------------------

    def resolve_input(self, p: str) -> Path:
        """An input path: relative paths resolve against `base_dir`."""
        path = Path(p).expanduser()
        return path if path.is_absolute() else (Path(self.base_dir) / path).resolve()

    def resolve_output(self, p: str) -> Path:
        """An output path, which must stay inside `base_dir` (no absolute or `..` escapes)."""
        return resolve_inside(Path(self.base_dir), p)

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | os.PathLike[str] | None = None) -> "JobSpec":
        """Validate a mapping. Schema errors raise pydantic's `ValidationError`; an output path that
        escapes `base_dir` raises `SpecError` naming it (both are `ValueError`s)."""
        data = dict(data)
        if base_dir is not None:
            data["base_dir"] = str(Path(base_dir).resolve())
        spec = cls.model_validate(data)
        escapes = list(_output_path_errors(spec))
        if escapes:
            raise SpecError(escapes)
        return spec

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "JobSpec":
        """Read YAML (`.yaml`/`.yml`) or JSON; relative paths resolve against the file's folder.

        Raises `SpecError` listing every field error.
        """
        path = Path(path)
        data = _load_mapping(path)
        try:
            return cls.from_dict(data, base_dir=path.resolve().parent)
        except ValidationError as exc:
            raise SpecError(_field_errors(exc)) from None


def resolve_inside(root: Path, p: str) -> Path:
    """`root / p`, refusing absolute paths and anything that resolves outside `root`."""
    if Path(p).is_absolute():
        raise ValueError(f"output path must be relative to the spec folder, got absolute {p!r}")
    root = root.resolve()
    out = (root / p).resolve()
    if out != root and root not in out.parents:
        raise ValueError(f"output path {p!r} escapes its root")
    return out


# --- errors --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldError:
    """One problem in a spec: `field` is a dotted path (`source.path`, `stages.0.cls`)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class SpecError(ValueError):
    """A job spec that does not validate; `errors` lists every problem with its field path."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("invalid job spec:\n" + "\n".join(f"  {e}" for e in errors))


def _load_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError([FieldError("", f"spec file not found: {path.name}")])
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise different types; both are user errors here
        raise SpecError([FieldError("", f"cannot parse {path.name}: {exc}")]) from None
    if not isinstance(data, dict):
        raise SpecError([FieldError("", f"{path.name} must hold a mapping, got {type(data).__name__}")])
    return data


def _loc_part(x: Any) -> str:
    """One step of a field path: names as they are, except ones a dotted path would hide
    (empty, or holding a dot or a space), which are quoted."""
    if isinstance(x, str) and (not x or "." in x or not x.isprintable() or x != x.strip()):
        return repr(x)
    return str(x)


def _field_errors(exc: ValidationError) -> list[FieldError]:
    out = []
    for e in exc.errors():
        loc = ".".join(_loc_part(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {_short_repr(e['input'])})"
        out.append(FieldError(loc, msg))
    return out


def _short_repr(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _output_path_errors(spec: JobSpec) -> Iterable[FieldError]:
    """Output paths that would write outside the spec's folder: the file sink's folder, and a
    relative checkpoint or spill folder (a URI or an absolute folder is an explicit root of its own)."""
    if spec.sink.path and spec.sink.type in ("parquet", "jsonl"):
        try:
            spec.resolve_output(spec.sink.path)
        except ValueError as exc:
            yield FieldError("sink.path", str(exc))
    ckpt = spec.checkpoint.path
    if ckpt and "://" not in ckpt and not Path(ckpt).is_absolute():
        try:
            spec.resolve_output(ckpt)
        except ValueError as exc:
            yield FieldError("checkpoint.path", str(exc))
    spill = spec.scheduler.memory.spill_dir
    if spill and not Path(spill).is_absolute():
        try:
            spec.resolve_output(spill)
        except ValueError as exc:
            yield FieldError("scheduler.memory.spill_dir", str(exc))


def _semantic_errors(spec: JobSpec) -> Iterable[FieldError]:
    """Checks that need the file system or imports (beyond the schema)."""
    src = spec.source
    if src.path and src.type in ("jsonl", "parquet", "arrow"):
        p = spec.resolve_input(src.path)
        if not p.exists() and not src.follow:
            yield FieldError("source.path", f"file not found: {src.path}")
    yield from _output_path_errors(spec)
    if spec.model is not None and spec.model.path:
        if not spec.resolve_input(spec.model.path).exists():
            yield FieldError("model.path", f"not found: {spec.model.path}")
    for i, st in enumerate(spec.stages):
        if isinstance(st.cls, str):
            try:
                import_stage_class(st.cls)
            except Exception as exc:  # import errors are user errors here
                yield FieldError(f"stages.{i}.cls", str(exc))


def import_stage_class(ref: str) -> type:
    """Import `"package.module:Class"` (no evaluation: a module import and an attribute lookup)."""
    import importlib

    mod_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod_name!r}: {exc}") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type) or not callable(getattr(obj, "process", None)):
        raise ValueError(f"{ref!r} is not a class with a process(batch) method")
    return obj


def validate(path: str | os.PathLike[str] | dict[str, Any], *, base_dir: str | None = None) -> list[FieldError]:
    """Every error in a spec file (or mapping), each with its field path; empty when valid."""
    if isinstance(path, (str, os.PathLike)):
        try:
            data = _load_mapping(Path(path))
        except SpecError as exc:
            return exc.errors
        base = str(Path(path).resolve().parent)
    else:
        data, base = path, base_dir or os.getcwd()
    try:
        spec = JobSpec.model_validate({**data, "base_dir": str(Path(base).resolve())})
    except ValidationError as exc:
        errors = _field_errors(exc)
        # Still report file-system problems of the sections that did parse.
        errors += _partial_semantic_errors(data, base)
        return errors
    return list(_semantic_errors(spec))


def _partial_semantic_errors(data: dict[str, Any], base: str) -> list[FieldError]:
    out: list[FieldError] = []
    src = data.get("source")
    if isinstance(src, dict) and isinstance(src.get("path"), str) and src.get("type") in ("jsonl", "parquet", "arrow"):
        p = Path(src["path"])
        p = p if p.is_absolute() else Path(base) / p
        if not p.exists() and not src.get("follow"):
            out.append(FieldError("source.path", f"file not found: {src['path']}"))
    for section in ("sink", "checkpoint"):
        sub = data.get(section)
        path = sub.get("path") if isinstance(sub, dict) else None
        if not isinstance(path, str) or (section == "checkpoint" and ("://" in path or Path(path).is_absolute())):
            continue
        try:
            resolve_inside(Path(base), path)
        except ValueError as exc:
            out.append(FieldError(f"{section}.path", str(exc)))
    return out
