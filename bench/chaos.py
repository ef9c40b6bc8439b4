"""Chaos: ~1,000 objects of the four kinds while everything around the operator fails.

The operator (its own process, talking to the API server through a fault-injecting proxy) is
SIGKILLed at 24 seeded moments; the API server is restarted twice and etcd once; 5 % of the
operator's writes are answered 409 Conflict; the watches go silent for 30 s while a wave of
ModelVersions lands; Prometheus is stopped for 150 s during a canary step; a canary's model
server is SIGKILLed mid-rollout. Meanwhile: ModelVersions in waves (some failing by design,
some late, updated, deleted), tiny TrainingRuns of the local executor (one re-specified while
it runs), canaries with real traffic (a broken version rolled back, a good one promoted), a
DriftPolicy that watches and the closed loop (drift → retrain → canary). Then every object is
deleted, and the namespace.

The invariants (hack/chaos/invariants.py): every object converges (observedGeneration ==
generation, Ready or the expected failure); no duplicate children (ModelVersions per run
attempt, pipeline runs per attempt, model servers per version, retrains per breach); no
traffic to a canary after its rollback; no promotion while metrics were missing; no finalizer
left after deletion; the namespace deletion completes.

    make chaos                                   # ~20 minutes on 2 cores
    .venv/bin/python bench/chaos.py --objects 300 --seed 3
    .venv/bin/python bench/chaos.py --short      # the sizes of tests/integration/test_chaos.py

Ends with ``RESULT objects=… kills=… converged=… lost=… duplicates=… stuck_finalizers=…
promoted_without_data=…`` (then more counts); the full report goes to bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hack.chaos.scenario import counts, run_chaos, save  # noqa: E402
from hack.chaos.world import ChaosConfig, short_config  # noqa: E402
from hack.cluster import cluster as cluster_mod  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--short", action="store_true", help="the test's sizes")
    parser.add_argument("--work-dir", type=Path, default=cluster_mod.CACHE / "chaos")
    parser.add_argument("--cluster-dir", type=Path, default=cluster_mod.CACHE / "cluster-chaos")
    parser.add_argument("--output", type=Path, default=RESULTS / "chaos.json")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a ChaosConfig field, e.g. --set fault_window_s=300 (repeatable)",
    )
    args = parser.parse_args()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    if args.short:
        cfg = short_config(args.work_dir, args.cluster_dir, seed=args.seed)
    else:
        cfg = ChaosConfig(args.work_dir, args.cluster_dir, seed=args.seed, objects=args.objects)
    fields = {f.name: f for f in dataclasses.fields(ChaosConfig)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            parser.error(f"--set {item}: no ChaosConfig field {key!r} (one of {', '.join(fields)})")
        kind = type(getattr(cfg, key))
        parsed: Any = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        overrides: dict[str, Any] = {key: parsed}
        cfg = dataclasses.replace(cfg, **overrides)
    report = asyncio.run(run_chaos(cfg))
    save(
        {
            "date": dt.date.today().isoformat(),
            "machine": "2 shared cores, no GPU; control plane, Prometheus, model servers, "
            "training and the operator on the same cores",
            "command": " ".join(["bench/chaos.py", *sys.argv[1:]]),
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "counts": counts(report),
            "report": report,
        },
        args.output,
    )
    print(json.dumps(counts(report)))
    print(report["result"])
    c = counts(report)
    ok = (
        c["converged"] == c["objects"]
        and c["lost"] == c["duplicates"] == c["stuck_finalizers"] == 0
        and c["promoted_without_data"] == c["traffic_after_rollback"] == 0
        and c["namespace_deleted"] == 1
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
