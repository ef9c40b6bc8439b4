"""Model serving: the artifact format (``artifact``), the kserve model server that serves it
(``model_server``), dynamic batching (``batching``), the response cache (``cache``), the
runtime's Prometheus metrics (``metrics``) and the local traffic splitter (``router``).

Nothing is imported here: the operator imports this package (for the router) without torch or
kserve installed; the runtime lives in the serving image (``python -m kubeloop.serving``).
"""
