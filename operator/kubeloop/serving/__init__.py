"""Model serving: the artifact format (``artifact``), the served version (``predictor``: the
runner, ``batching``, the response ``cache``, the runtime's Prometheus ``metrics``, the
recorders of ``recording``), the wire protocols (``protocol``), the runtime's HTTP app
(``app``, uvicorn + uvloop) and V2 gRPC server (``grpc_server``), kserve's ``Model`` adapter
kept as the protocol reference (``model_server``) and the local traffic splitter (``router``).

Nothing is imported here: the operator imports this package (for the router) without torch or
kserve installed; the runtime lives in the serving image (``python -m kubeloop.serving``).
"""
