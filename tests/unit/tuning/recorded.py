"""Simulated requests written to a store the way the collectors would have stored a real replica's."""

from __future__ import annotations

from controlplane.store.repo import Store
from controlplane.tuning.simulator import SimResult


def store_replica_run(store: Store, res: SimResult, replica: str, *, base_unix_s: float, kv_blocks: int,
                      block_size: int = 16, vllm_queue: bool = False) -> None:
    """The run's requests as `llm_request` rows of `replica`, and one engine sample that knows its KV capacity.
    vllm_queue: queue times as vLLM stamps them, after the step running when the request reached the engine
    (0 here: only for a replica that never holds a request back for longer); that wait then shows in
    TTFT - queue - prefill, as in vLLM's spans."""
    rows = res.rows(base_unix_s=base_unix_s)
    for i, r in enumerate(rows):
        r.update(trace_id=f"{i:032x}", span_id=f"{i:016x}", replica=replica)
        if vllm_queue and r["queue_s"] is not None:
            r["queue_s"] = 0.0
    store.write_spans(rows, [])
    rid = store.register_replica(replica, url=None, backend="local")
    store.write_engine_sample({"replica_id": rid, "ts_unix_s": base_unix_s + 10, "scrape_ok": True,
                               "num_running": None, "kv_capacity_tokens": kv_blocks * block_size,
                               "kv_block_size_tokens": block_size})
