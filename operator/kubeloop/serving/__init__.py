"""Model serving: the artifact format, the kserve runtime that serves it, dynamic batching,
the response cache and the runtime's Prometheus metrics.

Nothing is imported here: the operator imports this package (for the router) without torch or
kserve installed; the runtime lives in the serving image (``python -m kubeloop.serving``).
"""
