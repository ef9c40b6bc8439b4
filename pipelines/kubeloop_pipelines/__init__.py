"""kubeloop's training pipeline: KFP v2 components whose bodies are the real ML code.

- ``ml/``: the machine learning (datasets, preprocessing, models, imbalance, training, tuning,
  evaluation, explanation, optimisation), plain Python, unit-tested without KFP.
- ``steps/``: one module per pipeline step; ``run(...)`` reads and writes artifact directories
  and returns a :class:`~kubeloop_pipelines.contract.StepResult`.
- ``components.py``: the KFP components, thin wrappers that call a step.
- ``step_runner.py``: what every component does around its step (``run_step``): the progress
  record, the KFP metrics, the error handling.
- ``compiler.py``: TrainingRun spec → KFP pipeline → IR YAML (deterministic).
- ``progress.py``: what a step reports while it runs (read by the operator).
"""
