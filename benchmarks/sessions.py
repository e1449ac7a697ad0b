"""Sessions benchmark: the memory-budget scheduler under many concurrent sessions.

Cells (each in its own process, peak RSS per cell):
- throughput: 200 sessions with interleaved turns whose total state (KV-shaped StateBlobs, SmolLM2
  geometry: 30 layers x K/V x 3 heads x 64 dims, bf16) is >= 10x the device budget. Runs the same
  turn sequence unbounded (every state in one dict: the peer) and scheduler-managed (device, host,
  two peer state-store actors on a local Ray, disk), with lookahead prefetch in a background thread
  and with plain LRU and no prefetch. A turn is `get -> compute -> admit`; compute is a fixed
  torch op on the state (`light`: one elementwise update of K and V) or that plus a fixed matmul
  load standing in for a model turn (`model_like`, ~15-25 ms on one core).
  `*_cluster`: the same with the two peer stores on the two other nodes of a three-node
  `ray.cluster_utils.Cluster` (head = the driver's node).
- engine: real sessions of `streamctx.Engine` (a tiny random Llama, and a smaller run on SmolLM2)
  with interleaved turns (feed a user message, generate greedily), all live in the engine
  (unbounded) vs under `TieredSessions` (one live session, the rest spilled through device, host,
  peer and disk budgets with total state >= 10x device + host); the generated tokens of the two
  runs are compared.
- bandwidth: spill (put) and restore (get) bytes/s of each tier vs its raw medium moving the same
  bytes: host vs a tensor memcpy, disk vs a plain file write / read, peer vs a raw `ray.put` /
  `ray.get` (plus one copy to own the bytes, as a restore must); `peer_cluster`: stores on other
  nodes, spill awaited until the store owns the bytes, vs a raw Ray object transfer to a peer node.

Run: flock /tmp/streamctx-bench.lock python benchmarks/sessions.py [--cap 900] [--only bw]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Cell  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sessions"
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2  # bf16 K and V: 23,040


def kv_state(seed: int, tokens: int):
    import torch

    from streamctx.state import StateBlob

    g = torch.Generator().manual_seed(seed)
    shape = (LAYERS, KV_HEADS, tokens, HEAD_DIM)
    return StateBlob(
        "bench.kv",
        {"k": torch.randn(shape, generator=g).to(torch.bfloat16),
         "v": torch.randn(shape, generator=g).to(torch.bfloat16),
         "pos": torch.tensor([tokens], dtype=torch.int64)},
        {"tokens": tokens},
    )


def _light_turn(blob):
    from streamctx.state import StateBlob

    k, v = blob.tensors["k"], blob.tensors["v"]
    return StateBlob(blob.kind, {"k": k * 0.5 + 1, "v": v * 0.5 - 1, "pos": blob.tensors["pos"] + 1},
                     dict(blob.meta))


_W: dict[str, Any] = {}


def _model_like_turn(blob):
    import torch

    if "w" not in _W:
        g = torch.Generator().manual_seed(0)
        _W["w"] = torch.randn(384, 384, generator=g)
        _W["x"] = torch.randn(64, 384, generator=g)
    x = _W["x"]
    for _ in range(60):
        x = torch.tanh(x @ _W["w"])
    return _light_turn(blob)


TURNS: dict[str, Callable[[Any], Any]] = {"light": _light_turn, "model_like": _model_like_turn}
PEER_NODES = ("peer_a", "peer_b")


def _start_ray(cluster: bool) -> Any:
    """A local Ray (one node), or a three-node `ray.cluster_utils.Cluster`: the head (the driver's
    node, 1 CPU) and two peer nodes (1 CPU each, custom resources `peer_a`, `peer_b`). Returns the
    Cluster or None."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}}
    if not cluster:
        # address="local": a fresh instance even when another Ray runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
        return None
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for name in PEER_NODES:
        c.add_node(num_cpus=1, resources={name: 1})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, runtime_env=env)
    return c


def _stop_ray(cluster: Any) -> None:
    import ray

    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


def _peer_stores(cluster: Any, capacity: int) -> list[Any]:
    from streamctx.storage.peer import spawn_state_stores

    if cluster is None:
        return spawn_state_stores(2, capacity)
    # Half of each node's marker resource: the raw-medium actor of the bandwidth cell takes the other half.
    return spawn_state_stores(2, capacity, options=[{"resources": {n: 0.5}} for n in PEER_NODES])


class RawPeer:
    """The raw medium for the peer tier: a plain actor on a peer node pulling / serving arrays."""

    def pull(self, wrapped: list[Any]) -> int:
        import ray

        arr = ray.get(wrapped[0])  # the transfer into this node's object store
        return int(arr[:: 1 << 16].sum())

    def serve(self, nbytes: list[int]) -> list[Any]:
        import numpy as np
        import ray

        return [ray.put(np.full(n, 7, dtype=np.uint8)) for n in nbytes]  # owned here, on this node


def _workload(n_sessions: int, turns_per_session: int, seed: int) -> tuple[list[int], list[str]]:
    rng = random.Random(seed)
    tokens = [rng.randrange(64, 193) for _ in range(n_sessions)]
    order = [f"s{i}" for i in range(n_sessions) for _ in range(turns_per_session)]
    rng.shuffle(order)
    return tokens, order


def throughput(mode: str, turn: str, n_sessions: int = 200, turns_per_session: int = 4,
               device_fraction: float = 0.1, lookahead: int = 32, seed: int = 0,
               cluster: bool = False) -> dict[str, Any]:
    """Turns per second of an interleaved multi-session run, unbounded or scheduler-managed.

    cluster: the peer stores run on two other nodes of a three-node `ray.cluster_utils.Cluster`."""
    harness.set_threads(1)
    tokens, order = _workload(n_sessions, turns_per_session, seed)
    turn_fn = TURNS[turn]
    total = sum(t * BYTES_PER_TOKEN for t in tokens)
    row: dict[str, Any] = {"sessions": n_sessions, "turns": len(order), "total_state_mb": total / 2**20}

    if mode == "unbounded":
        states = {f"s{i}": kv_state(i, t) for i, t in enumerate(tokens)}
        t0 = time.perf_counter()
        for sid in order:
            states[sid] = turn_fn(states[sid])
        wall = time.perf_counter() - t0
        row.update(turns_per_s=len(order) / wall, wall_s=wall)
        return row

    from streamctx.schedulers.memory_budget import MemoryBudgetScheduler
    from streamctx.schedulers.placement import LRU, Lookahead
    from streamctx.storage import DiskTier, MemoryTier
    from streamctx.storage.peer import PeerTier

    device = int(total * device_fraction)
    host = device
    peer_each = device
    ray_cluster = _start_ray(cluster)
    spill_root = tempfile.mkdtemp(prefix="streamctx-bench-")
    disk = DiskTier(spill_root)
    peer = PeerTier(_peer_stores(ray_cluster, peer_each))
    tiers = [MemoryTier("device", "cpu", device), MemoryTier("host", "cpu", host), peer, disk]
    prefetch = mode == "lookahead"
    sched = MemoryBudgetScheduler(tiers, Lookahead(LRU()) if prefetch else LRU())
    try:
        for i, t in enumerate(tokens):
            sched.admit(f"s{i}", kv_state(i, t))
        setup = sched.stats()
        sched.reset_stats()  # count the run only, not the admission of the initial states
        max_live = 0
        if prefetch:
            sched.start_prefetcher()
        t0 = time.perf_counter()
        for i, sid in enumerate(order):
            if prefetch:
                sched.hint_upcoming(order[i + 1 : i + 1 + lookahead])
            blob = sched.get(sid, pin=True)
            new = turn_fn(blob)
            del blob
            sched.admit(sid, new)
            max_live = max(max_live, sched.live_device_bytes())
        wall = time.perf_counter() - t0
        sched.stop_prefetcher()
        st = sched.stats()
        row["peer_items_per_store"] = [x["items"] for x in peer.store_stats()]
    finally:
        sched.close()
        disk.close()
        _stop_ray(ray_cluster)
    row.update(
        turns_per_s=len(order) / wall, wall_s=wall,
        device_budget_mb=device / 2**20, host_budget_mb=host / 2**20, peer_budget_mb=2 * peer_each / 2**20,
        total_over_device=total / device, total_over_device_host=total / (device + host),
        max_live_device_mb=max_live / 2**20, budget_held=max_live <= device,
        hit_rate=st["hit_rate"], prefetches=st["prefetches"], prefetch_hits=st["prefetch_hits"],
        misses=st["misses"], stall_s=st["stall_s"], spills=st["spills"], restores=st["restores"],
        tiers_at_end={k: v["sessions"] for k, v in st["tiers"].items()},
        moves={k: {"count": v["count"], "mb": v["bytes"] / 2**20,
                   "mb_per_s": (v["bandwidth_Bps"] or 0) / 2**20} for k, v in st["moves"].items()},
        setup_spills=setup["spills"], load_1m=os.getloadavg()[0],
    )
    return row


def engine_sessions(model: str, mode: str, n_sessions: int, turns_per_session: int, feed_tokens: int,
                    gen_tokens: int, device_fraction: float = 0.09, lookahead: int = 8,
                    seed: int = 0) -> dict[str, Any]:
    """Interleaved turns of real Engine sessions: all live (`unbounded`) or under TieredSessions."""
    harness.set_threads(1 if model == "tiny" else 2)
    from streamctx import Engine

    if model == "tiny":
        from tests.fixtures.tiny_models import make_tiny_llama

        folder = make_tiny_llama(Path(tempfile.mkdtemp(prefix="streamctx-sess-")) / "tiny", hidden=64, heads=4,
                                 kv_heads=2, head_dim=16, layers=4, vocab_size=512, seed=0)
        engine = Engine.load(folder, block_size=16)
    else:
        engine = Engine.load(model, block_size=64)
    vocab = min(engine.config.vocab_size, 512)
    rng = random.Random(seed)
    order = [f"s{i}" for i in range(n_sessions) for _ in range(turns_per_session)]
    rng.shuffle(order)
    work = [(sid, [rng.randrange(3, vocab) for _ in range(feed_tokens)]) for sid in order]
    row: dict[str, Any] = {"sessions": n_sessions, "turns": len(work)}
    tokens: list[list[int]] = []

    def turn(s, ids):
        s.feed(ids)
        tokens.append(s.generate(gen_tokens).token_ids)

    if mode == "unbounded":
        t0 = time.perf_counter()
        for sid, ids in work:
            turn(engine.session(sid), ids)
        wall = time.perf_counter() - t0
        total = sum(len(s.save()) for s in engine.sessions.values())
        row.update(turns_per_s=len(work) / wall, wall_s=wall, total_state_mb=total / 2**20)
    else:
        from streamctx.schedulers.memory_budget import MemoryBudgetScheduler
        from streamctx.schedulers.placement import LRU, Lookahead
        from streamctx.storage import DiskTier, MemoryTier
        from streamctx.storage.peer import PeerTier
        from streamctx.tiering import TieredSessions

        # Budgets from the final state size (the state grows by the same tokens every turn).
        per_session = (feed_tokens + gen_tokens) * turns_per_session
        probe = engine.session("__probe")
        probe.feed([5] * per_session)
        final = len(probe.save()) * n_sessions
        probe.close()
        device = max(int(final * device_fraction), 2 * final // n_sessions)
        host = device
        ray_cluster = _start_ray(mode == "tiered_cluster")
        disk = DiskTier(tempfile.mkdtemp(prefix="streamctx-bench-"))
        peer = PeerTier(_peer_stores(ray_cluster, 2 * device))
        sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", device), MemoryTier("host", "cpu", host),
                                       peer, disk], Lookahead(LRU()))
        tiered = TieredSessions(engine, sched, max_live=1)
        max_live = 0
        try:
            sched.start_prefetcher()
            t0 = time.perf_counter()
            for i, (sid, ids) in enumerate(work):
                tiered.hint_upcoming([w[0] for w in work[i + 1:i + 1 + lookahead]])
                turn(tiered.session(sid), ids)
                max_live = max(max_live, sched.live_device_bytes())
            wall = time.perf_counter() - t0
            sched.stop_prefetcher()
            tiered.release_all()
            st = tiered.stats()
        finally:
            sched.close()
            disk.close()
            _stop_ray(ray_cluster)
        total = sum(t["used"] for t in st["tiers"].values())
        row.update(
            turns_per_s=len(work) / wall, wall_s=wall, total_state_mb=total / 2**20,
            device_budget_mb=device / 2**20, total_over_device=total / device,
            total_over_device_host=total / (device + host), max_live_device_mb=max_live / 2**20,
            budget_held=max_live <= device, hit_rate=st["hit_rate"], prefetches=st["prefetches"],
            stall_s=st["stall_s"], save_s=st["save_s"], restore_s=st["restore_s"], spills=st["spills"],
            restores=st["restores"], tiers_at_end={k: v["sessions"] for k, v in st["tiers"].items()},
        )
    digest = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]
    row.update(tokens_sha=digest, load_1m=os.getloadavg()[0])
    return row


def _median_rate(nbytes: int, fn: Callable[[], Any], repeats: int = 3) -> float:
    return nbytes / harness.time_fn(fn, warmup=1, repeats=repeats, max_time_s=20)


def bandwidth(tier: str, n_states: int = 24, tokens: int = 128) -> dict[str, Any]:
    """Spill/restore bytes per second of one tier vs its raw medium on the same bytes."""
    harness.set_threads(1)
    import numpy as np
    import torch

    from streamctx.storage import DiskTier, MemoryTier

    blobs = [kv_state(i, tokens) for i in range(n_states)]
    nbytes = sum(b.nbytes() for b in blobs)
    keys = [f"s{i}" for i in range(n_states)]
    row: dict[str, Any] = {"mb_moved": nbytes / 2**20, "state_mb": blobs[0].nbytes() / 2**20}

    def roundtrip(store, put_blobs):
        def spill():
            for k in keys:
                if k in store:
                    store.delete(k)
            for k, b in zip(keys, put_blobs):
                store.put(k, b)

        def restore():
            for k in keys:
                store.get(k)

        return spill, restore

    if tier == "host":
        # On a CPU-only machine the device and host tiers share memory and a move hands the tensors
        # over without copying; measure the copying path (StateBlob.to, as with a GPU or pinned host).
        store = MemoryTier("host", "cpu", None)

        def spill():
            for k in keys:
                if k in store:
                    store.delete(k)
            for k, b in zip(keys, blobs):
                store.put(k, b.to("cpu"))

        def restore():
            for k in keys:
                store.get(k).to("cpu")

        src = [t for b in blobs for t in b.tensors.values()]
        dst = [torch.empty_like(t) for t in src]

        def raw_spill():
            for d, t in zip(dst, src):
                d.copy_(t)

        raw_restore = raw_spill
        cleanup = lambda: None  # noqa: E731
    elif tier == "disk":
        store = DiskTier()
        spill, restore = roundtrip(store, blobs)
        raw_dir = Path(tempfile.mkdtemp(prefix="streamctx-raw-"))
        payloads = [bytes(np.random.default_rng(i).integers(0, 256, b.nbytes(), dtype=np.uint8)) for i, b in
                    enumerate(blobs)]

        def raw_spill():
            for k, p in zip(keys, payloads):
                with open(raw_dir / k, "wb") as f:
                    f.write(p)

        def raw_restore():
            for k in keys:
                (raw_dir / k).read_bytes()

        def cleanup():
            store.close()
            for p in raw_dir.iterdir():
                p.unlink()
            raw_dir.rmdir()
    elif tier == "peer":
        import ray

        from streamctx.storage.peer import PeerTier

        ray_local = _start_ray(False)
        store = PeerTier(_peer_stores(ray_local, 2 * nbytes))
        spill, restore = roundtrip(store, blobs)
        arrays = [np.random.default_rng(i).integers(0, 256, b.nbytes(), dtype=np.uint8) for i, b in enumerate(blobs)]
        refs: list[Any] = []

        def raw_spill():
            refs.clear()
            refs.extend(ray.put(a) for a in arrays)

        def raw_restore():
            for r in refs:
                np.array(ray.get(r), copy=True)

        cleanup = ray.shutdown
    elif tier == "peer_cluster":
        # Stores on the two peer nodes of a three-node Cluster. A spill is done when the store on
        # the other node owns the bytes (its answer is awaited). The raw medium is a plain Ray
        # object transfer: the driver puts an array and an actor on a peer node gets it; restore
        # raw: the driver gets (and owns a copy of) an array created on a peer node.
        import ray

        from streamctx.storage.peer import PeerTier

        ray_cluster = _start_ray(True)
        store = PeerTier(_peer_stores(ray_cluster, 2 * nbytes))
        put_only, restore = roundtrip(store, blobs)

        def spill():
            put_only()
            store.store_stats()  # waits for every store's confirmation

        sizes = [b.nbytes() for b in blobs]
        arrays = [np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8) for i, n in enumerate(sizes)]
        raw_cls = ray.remote(num_cpus=0)(RawPeer)
        sinks = [raw_cls.options(resources={n: 0.5}).remote() for n in PEER_NODES]
        served = ray.get(sinks[0].serve.remote(sizes))

        def raw_spill():
            ray.get([sinks[i % 2].pull.remote([ray.put(a)]) for i, a in enumerate(arrays)])

        def raw_restore():
            for r in served:
                np.array(ray.get(r), copy=True)

        def cleanup():
            _stop_ray(ray_cluster)
    else:
        raise ValueError(f"unknown tier {tier!r}")

    try:
        row["spill_mb_s"] = _median_rate(nbytes, spill) / 2**20
        row["raw_spill_mb_s"] = _median_rate(nbytes, raw_spill) / 2**20
        row["restore_mb_s"] = _median_rate(nbytes, restore) / 2**20
        row["raw_restore_mb_s"] = _median_rate(nbytes, raw_restore) / 2**20
        # Bit-exactness of what this tier returns, checked on the measured states.
        got = [store.get(k) for k in keys]
        row["bit_exact"] = all(g.equal(b) for g, b in zip(got, blobs))
    finally:
        cleanup()
    row["spill_vs_raw"] = row["spill_mb_s"] / row["raw_spill_mb_s"]
    row["restore_vs_raw"] = row["restore_mb_s"] / row["raw_restore_mb_s"]
    row["load_1m"] = os.getloadavg()[0]
    return row


CELLS = [
    # 128-token states (2.8 MiB, as in the throughput cells) and 1024-token states (22.5 MiB, a
    # long-context session's KV): per-move overheads matter for the first, bandwidth for the second.
    Cell(f"bw_{tier}_{tokens}tok", bandwidth, {"tier": tier, "tokens": tokens, "n_states": n},
         group="bandwidth", timeout_s=300)
    for tokens, n in [(128, 24), (1024, 6)]
    for tier in ["host", "disk", "peer", "peer_cluster"]
] + [
    Cell(f"tput_{turn}_{mode}", throughput, {"mode": mode, "turn": turn}, group=f"throughput_{turn}",
         timeout_s=900)
    for turn, mode in [("model_like", "unbounded"), ("model_like", "lookahead"), ("light", "unbounded"),
                       ("light", "lookahead"), ("model_like", "lru"), ("light", "lru")]
] + [
    # The same run with the peer stores on two other nodes of a three-node Cluster.
    Cell(f"tput_{turn}_{mode}_cluster", throughput, {"mode": mode, "turn": turn, "cluster": True},
         group=f"throughput_{turn}", timeout_s=900)
    for turn, mode in [("model_like", "lookahead")]
] + [
    Cell(f"engine_{model}_{mode}", engine_sessions,
         {"model": model, "mode": mode, **size}, group=f"engine_{model}", timeout_s=900)
    for model, size in [("tiny", {"n_sessions": 200, "turns_per_session": 3, "feed_tokens": 48, "gen_tokens": 8}),
                        ("smollm2", {"n_sessions": 24, "turns_per_session": 3, "feed_tokens": 96, "gen_tokens": 8})]
    for mode in ("unbounded", "tiered", "tiered_cluster")
]

COLUMNS = ["cell", "status", "turns_per_s", "vs_unbounded", "same_tokens", "hit_rate", "stall_s", "spills", "restores",
           "total_over_device", "max_live_device_mb", "device_budget_mb", "budget_held",
           "spill_mb_s", "raw_spill_mb_s", "spill_vs_raw", "restore_mb_s", "raw_restore_mb_s",
           "restore_vs_raw", "bit_exact", "load_1m", "peak_rss_mib"]


def _postprocess(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    engine_base = {r["model"]: r for r in rows
                   if r.get("group", "").startswith("engine_") and r.get("mode") == "unbounded" and r.get("status") == "ok"}
    for r in rows:
        ref = engine_base.get(r.get("model"))
        if r.get("group", "").startswith("engine_") and r.get("mode") != "unbounded" and ref and r.get("status") == "ok":
            r["vs_unbounded"] = r["turns_per_s"] / ref["turns_per_s"]
            r["same_tokens"] = r["tokens_sha"] == ref["tokens_sha"]
    base = {r["turn"]: r["turns_per_s"] for r in rows
            if r.get("mode") == "unbounded" and r.get("status") == "ok" and "turn" in r}
    for r in rows:
        if r.get("mode") in ("lookahead", "lru") and r.get("status") == "ok" and r["turn"] in base:
            r["vs_unbounded"] = r["turns_per_s"] / base[r["turn"]]
    return rows


if __name__ == "__main__":
    harness.main(CELLS, results=RESULTS, prefix="sessions", columns=COLUMNS, postprocess=_postprocess,
                 title="Sessions: memory-budget scheduler vs unbounded; tier bandwidth vs raw media")
