"""Fault tools for the chaos suite (``make chaos``, ``tests/integration/test_chaos.py``).

- ``proxy``: an HTTPS reverse proxy in front of the kube-apiserver for the operator's connection
  only: it answers a seeded fraction of writes with ``409 Conflict`` and can make watch streams
  go silent (open, events withheld) for a while;
- ``faults``: restarting the API server and etcd of the local control plane, stopping and
  starting Prometheus, SIGKILLing the operator (kept running like a kubelet would) and a model
  server of the local serving backend;
- ``record``: what the run saw while it ran (statuses, conditions, analyses, router weights,
  child processes), sampled from outside the operator;
- ``invariants``: pure checks over what was recorded (each one counts what it forbids);
- ``scenario``: the run itself, one code path for the bench and the test, sized by
  ``ChaosConfig``.
"""
