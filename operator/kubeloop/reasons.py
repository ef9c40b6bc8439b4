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
