"""Labels that more than one side writes or reads."""

from typing import Final

# Kueue admits a pod into a LocalQueue by this label (set on every pipeline task).
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
# A registered ModelVersion names the TrainingRun and attempt that registered it, so a
# restarted operator finds it instead of registering a second one.
TRAINING_RUN_LABEL: Final = "kubeloop.dev/training-run"
ATTEMPT_LABEL: Final = "kubeloop.dev/attempt"
# A retraining TrainingRun names the DriftPolicy that created it.
DRIFT_POLICY_LABEL: Final = "kubeloop.dev/drift-policy"
