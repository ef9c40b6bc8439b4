"""What the operator, the pipeline steps and the serving runtime agree on.

Free of torch, kfp, kopf and aiohttp (``reference`` alone needs numpy, and only the pipeline
and serving sides import it), so every side can import it without pulling in another's
machinery: durations and time stamps, labels, step names and the run-directory layout, the
metrics each task produces, the artifact layout and digest, the reference-distribution format
and the serving runtime's metric names.
"""
