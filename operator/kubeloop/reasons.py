"""Condition types and reasons: CamelCase constants in one place."""

from typing import Final

# Condition types.
READY: Final = "Ready"
PROGRESSING: Final = "Progressing"
DEGRADED: Final = "Degraded"
GATES_PASSED: Final = "GatesPassed"
DRIFTED: Final = "Drifted"

# Reasons.
RECONCILED: Final = "Reconciled"
RECOVERED: Final = "Recovered"  # Degraded=False after failures the daemon loop reported
INVALID_SPEC: Final = "InvalidSpec"
CROSS_NAMESPACE_REFERENCE: Final = "CrossNamespaceReference"
ARTIFACT_NOT_FOUND: Final = "ArtifactNotFound"
ARTIFACT_OUTSIDE_TENANT: Final = "ArtifactOutsideTenantPrefix"
ARTIFACT_DIGEST_MISMATCH: Final = "ArtifactDigestMismatch"
ARTIFACT_UNVERIFIED: Final = "ArtifactUnverified"
INVALID_NAME: Final = "InvalidName"
ALIAS_MOVED: Final = "AliasMoved"
ALIAS_CLAIMED: Final = "AliasClaimed"
API_UNAVAILABLE: Final = "ApiUnavailable"
RECONCILE_FAILED: Final = "ReconcileFailed"
REGISTERED: Final = "Registered"

# ModelDeployment.
SERVING: Final = "Serving"
NOT_SERVING: Final = "NotServing"
CANARY_STARTED: Final = "CanaryStarted"
CANARY_ADVANCED: Final = "CanaryAdvanced"
ANALYSIS_FAILED: Final = "AnalysisFailed"
ANALYSIS_INCONCLUSIVE: Final = "AnalysisInconclusive"
ROLLED_BACK: Final = "RolledBack"
PROMOTED: Final = "Promoted"
MODEL_VERSION_NOT_FOUND: Final = "ModelVersionNotFound"
MODEL_VERSION_NOT_READY: Final = "ModelVersionNotReady"
INCOMPATIBLE_SIGNATURE: Final = "IncompatibleSignature"
SERVING_FAILED: Final = "ServingFailed"
PROMETHEUS_UNAVAILABLE: Final = "PrometheusUnavailable"

# TrainingRun.
PENDING: Final = "Pending"
QUEUED: Final = "QueuedForGpuBudget"
GPU_REQUEST_IMPOSSIBLE: Final = "GpuRequestImpossible"
SUBMITTED: Final = "Submitted"
RUNNING: Final = "Running"
STEP_STARTED: Final = "StepStarted"
STEP_RETRYING: Final = "StepRetrying"
STEP_FAILED: Final = "StepFailed"
INVALID_INPUT: Final = "InvalidInput"
GATES_FAILED: Final = "GatesFailed"
SUCCEEDED: Final = "Succeeded"
SUPERSEDED: Final = "Superseded"
ATTEMPT_STARTED: Final = "AttemptStarted"
EXECUTOR_UNAVAILABLE: Final = "ExecutorUnavailable"
EXECUTOR_REJECTED: Final = "ExecutorRejected"
TIMED_OUT: Final = "TimedOut"

# Approval (TrainingRun spec.suspend, ModelDeployment rollout.approval).
SUSPENDED: Final = "Suspended"
AWAITING_APPROVAL: Final = "AwaitingApproval"
APPROVED: Final = "Approved"

# DriftPolicy.
WATCHING: Final = "Watching"
INCONCLUSIVE: Final = "Inconclusive"
DRIFT_DETECTED: Final = "DriftDetected"
DRIFT_CLEARED: Final = "DriftCleared"
RETRAIN_STARTED: Final = "RetrainStarted"
RETRAIN_HELD: Final = "RetrainHeld"
RETRAIN_FINISHED: Final = "RetrainFinished"
DRY_RUN: Final = "DryRun"
TARGET_NOT_FOUND: Final = "TargetNotFound"
NO_REFERENCE: Final = "NoReference"
TEMPLATE_NOT_FOUND: Final = "TemplateNotFound"
REBASELINED: Final = "Rebaselined"
