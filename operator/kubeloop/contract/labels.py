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

# Annotations.
# ``kubectl annotate trainingrun NAME kubeloop.dev/approve=true`` starts a suspended run
# (``spec.suspend``); on a ModelDeployment whose rollout needs approval, the value names the
# canary version allowed to take its last step (or ``true`` for whichever is rolling out).
APPROVE_ANNOTATION: Final = "kubeloop.dev/approve"
# On a retraining TrainingRun: why it was created (the DriftPolicy's evidence, JSON) and the
# same in one sentence.
DRIFT_EVIDENCE_ANNOTATION: Final = "kubeloop.dev/drift-evidence"
RETRAIN_REASON_ANNOTATION: Final = "kubeloop.dev/retrain-reason"
