"""The API server itself rejects bad resources with a message that names the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubeloop.backends.kube import (
    DRIFT_POLICIES,
    MODEL_DEPLOYMENTS,
    MODEL_VERSIONS,
    TRAINING_RUNS,
    ApiError,
    Kind,
    KubeClient,
)
from tests.conftest import load_examples

KINDS = {
    "ModelVersion": MODEL_VERSIONS,
    "TrainingRun": TRAINING_RUNS,
    "ModelDeployment": MODEL_DEPLOYMENTS,
    "DriftPolicy": DRIFT_POLICIES,
}

MV: dict[str, Any] = {
    "apiVersion": "kubeloop.dev/v1alpha1",
    "kind": "ModelVersion",
    "metadata": {"name": "m-v1"},
    "spec": {"modelName": "m", "version": 1, "artifact": {"uri": "s3://bucket/models/m/1"}},
}
TR: dict[str, Any] = {
    "apiVersion": "kubeloop.dev/v1alpha1",
    "kind": "TrainingRun",
    "metadata": {"name": "tr"},
    "spec": {
        "data": {"uri": "builtin://breast-cancer", "target": "target"},
        "registration": {"modelName": "bc"},
        "tuning": {
            "maxTrials": 4,
            "parallelTrials": 2,
            "searchSpace": [{"name": "learningRate", "type": "float", "min": 0.001, "max": 0.1}],
        },
    },
}
MD: dict[str, Any] = {
    "apiVersion": "kubeloop.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "md"},
    "spec": {"model": {"modelVersion": {"name": "m-v1"}}},
}
DP: dict[str, Any] = {
    "apiVersion": "kubeloop.dev/v1alpha1",
    "kind": "DriftPolicy",
    "metadata": {"name": "dp"},
    "spec": {
        "target": {"name": "md"},
        "signals": [{"name": "psi", "type": "psi", "feature": "*", "threshold": 0.2}],
    },
}


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``base`` with the dotted ``path`` set (or deleted when value is DELETE)."""
    doc = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


DELETE = object()

# (id, object, substrings the API server's message must contain: the field, and the cause)
BAD: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("mv-negative-version", with_(MV, "spec.version", -1), ("spec.version", "greater than")),
    ("mv-missing-artifact", with_(MV, "spec.artifact", DELETE), ("spec.artifact", "Required")),
    (
        "mv-http-artifact",
        with_(MV, "spec.artifact.uri", "http://example.com/m"),
        ("spec.artifact.uri", "should match"),
    ),
    (
        "mv-unknown-alias",
        with_(MV, "spec.aliases", ["prod"]),
        ("spec.aliases[0]", "Unsupported value"),
    ),
    (
        "mv-repeated-alias",
        with_(MV, "spec.aliases", ["latest", "latest"]),
        ("spec.aliases", "must not repeat"),
    ),
    (
        "mv-bad-metric-name",
        with_(MV, "spec.metrics", {"F1 score": 0.9}),
        ("spec.metrics", "keys must match"),
    ),
    ("mv-300-char-name", with_(MV, "metadata.name", "m" * 300), ("metadata.name",)),
    (
        "mv-64-char-name",
        with_(MV, "metadata.name", "m" * 64),
        ("metadata.name", "Too long"),
    ),
    (
        "mv-long-description",
        with_(MV, "spec.description", "x" * 5000),
        ("spec.description", "Too long"),
    ),
    (
        "mv-wrong-type",
        with_(MV, "spec.version", "one"),
        ("spec.version", "must be of type integer"),
    ),
    (
        "tr-negative-gpu",
        with_(TR, "spec.resources", {"gpu": -1}),
        ("spec.resources.gpu", "greater than or equal to 0"),
    ),
    (
        "tr-too-many-gpus",
        with_(TR, "spec.resources", {"gpu": 64}),
        ("spec.resources.gpu", "less than or equal to 16"),
    ),
    (
        "tr-unknown-family",
        with_(TR, "spec.model", {"family": "svm"}),
        ("spec.model.family", "Unsupported value"),
    ),
    ("tr-missing-target", with_(TR, "spec.data.target", DELETE), ("spec.data.target", "Required")),
    (
        "tr-bad-data-uri",
        with_(TR, "spec.data.uri", "ftp://host/data.csv"),
        ("spec.data.uri", "should match"),
    ),
    (
        "tr-parallel-over-max",
        with_(TR, "spec.tuning.parallelTrials", 8),
        ("spec.tuning.parallelTrials", "maxTrials must be >= parallelTrials"),
    ),
    (
        "tr-empty-search-space",
        with_(TR, "spec.tuning.searchSpace", []),
        ("spec.tuning.searchSpace", "should have at least 1 items"),
    ),
    (
        "tr-unknown-gate-metric",
        with_(TR, "spec.evaluation", {"gates": [{"metric": "f2", "value": 0.9}]}),
        ("spec.evaluation.gates[0].metric", "Unsupported value"),
    ),
    (
        "tr-grid-without-step",
        with_(TR, "spec.tuning.algorithm", "grid"),
        ("spec.tuning.searchSpace", "grid search needs a step"),
    ),
    (
        "tr-categorical-without-values",
        with_(TR, "spec.tuning.searchSpace", [{"name": "optimizer", "type": "categorical"}]),
        ("spec.tuning.searchSpace[0]", "a categorical parameter needs values"),
    ),
    (
        "md-steps-not-increasing",
        with_(MD, "spec.rollout", {"steps": [50, 25, 100]}),
        ("spec.rollout.steps", "strictly increasing"),
    ),
    (
        "md-steps-not-ending-at-100",
        with_(MD, "spec.rollout", {"steps": [10, 50]}),
        ("spec.rollout.steps", "must end at 100"),
    ),
    (
        "md-step-over-100",
        with_(MD, "spec.rollout", {"steps": [10, 150]}),
        ("spec.rollout.steps[1]", "less than or equal to 100"),
    ),
    (
        "md-two-model-sources",
        with_(MD, "spec.model.alias", {"modelName": "m"}),
        ("spec.model", "exactly one of modelVersion, alias or trainingRun"),
    ),
    (
        "md-cross-namespace-ref",
        with_(MD, "spec.model.modelVersion.namespace", "other"),
        ("spec.model.modelVersion.namespace", "cross-namespace references are refused"),
    ),
    (
        "md-min-over-max-replicas",
        with_(MD, "spec.serving", {"minReplicas": 3, "maxReplicas": 2}),
        ("spec.serving.minReplicas", "minReplicas must be <= maxReplicas"),
    ),
    (
        "md-bad-interval",
        with_(MD, "spec.rollout", {"interval": "1 minute"}),
        ("spec.rollout.interval", "should match"),
    ),
    (
        "dp-cross-namespace-target",
        with_(DP, "spec.target.namespace", "other"),
        ("spec.target.namespace", "cross-namespace references are refused"),
    ),
    (
        "dp-too-many-signals",
        with_(
            DP,
            "spec.signals",
            [{"name": f"s{i}", "type": "prediction", "threshold": 0.1} for i in range(33)],
        ),
        ("spec.signals", "must have at most 32 items"),
    ),
    (
        "dp-promql-without-query",
        with_(DP, "spec.signals", [{"name": "q", "type": "promql", "threshold": 1}]),
        ("spec.signals[0].query", "a promql signal needs query"),
    ),
    ("dp-unknown-field", with_(DP, "spec.retrain", True), ('unknown field "spec.retrain"',)),
    (
        "dp-window-shorter-than-interval",
        with_(with_(DP, "spec.interval", "5m"), "spec.window", "1m"),
        ("spec.window", "window must be at least interval"),
    ),
    (
        "dp-zero-interval",
        with_(DP, "spec.interval", "0s"),
        ("spec.interval", "must be at least 1s, not 0s"),
    ),
    (
        "dp-feature-on-accuracy",
        with_(
            DP,
            "spec.signals",
            [{"name": "a", "type": "accuracy", "feature": "x", "threshold": 0.8}],
        ),
        ("spec.signals[0].feature", "only for per-feature signals"),
    ),
    (
        "dp-share-without-star",
        with_(
            DP,
            "spec.signals",
            [{"name": "a", "type": "psi", "feature": "x", "share": 0.5, "threshold": 0.2}],
        ),
        ("spec.signals[0].share", "feature: '*' only"),
    ),
    (
        "dp-share-out-of-range",
        with_(
            DP,
            "spec.signals",
            [{"name": "a", "type": "psi", "feature": "*", "share": 1.5, "threshold": 0.2}],
        ),
        ("spec.signals[0].share", "less than or equal to 1"),
    ),
    (
        "dp-dry-run-observe",
        with_(DP, "spec.action", {"mode": "observe", "dryRun": True}),
        ("spec.action.dryRun", "dryRun applies to mode retrain"),
    ),
    (
        "dp-unknown-mode",
        with_(DP, "spec.action", {"mode": "panic"}),
        ("spec.action.mode", "Unsupported value"),
    ),
]

# Bounds, durations, label syntax, cron, type confusion: the pydantic models refuse each of
# these too (tests/unit/test_api_models.py), so the CRD and the models agree.
BOUNDS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    (
        "tr-node-selector-bad-key",
        with_(TR, "spec.resources", {"nodeSelector": {"bad key!": "x"}}),
        ("spec.resources.nodeSelector", "key bad key! is not a label key"),
    ),
    (
        "tr-node-selector-64-char-name",
        with_(TR, "spec.resources", {"nodeSelector": {"x" * 64: "y"}}),
        ("spec.resources.nodeSelector", "is not a label key"),
    ),
    (
        "tr-node-selector-254-char-prefix",
        with_(TR, "spec.resources", {"nodeSelector": {"a" * 254 + "/zone": "y"}}),
        ("spec.resources.nodeSelector", "is not a label key"),
    ),
    (
        "tr-node-selector-bad-value",
        with_(TR, "spec.resources", {"nodeSelector": {"zone": "not a value!"}}),
        ("spec.resources.nodeSelector.zone", "should match"),
    ),
    (
        "tr-node-selector-64-char-value",
        with_(TR, "spec.resources", {"nodeSelector": {"zone": "v" * 64}}),
        ("spec.resources.nodeSelector.zone", "Too long"),
    ),
    (
        "tr-node-selector-list",
        with_(TR, "spec.resources", {"nodeSelector": ["zone=a"]}),
        ("spec.resources.nodeSelector", "must be of type object"),
    ),
    (
        "serving-node-selector-bad-key",
        with_(MD, "spec.serving", {"resources": {"nodeSelector": {"-zone": "a"}}}),
        ("spec.serving.resources.nodeSelector", "key -zone is not a label key"),
    ),
    (
        "tr-toleration-bad-key",
        with_(TR, "spec.resources", {"tolerations": [{"key": "bad key!", "operator": "Exists"}]}),
        ("spec.resources.tolerations[0].key", "is not a label key"),
    ),
    (
        "tr-toleration-64-char-value",
        with_(TR, "spec.resources", {"tolerations": [{"key": "team", "value": "v" * 64}]}),
        ("spec.resources.tolerations[0].value", "Too long"),
    ),
    (
        "tr-cron-words",
        with_(TR, "spec.schedule", "every minute"),
        ("spec.schedule", "every minute is not a cron schedule"),
    ),
    (
        "tr-cron-six-fields",
        with_(TR, "spec.schedule", "0 0 3 * * *"),
        ("spec.schedule", "is not a cron schedule"),
    ),
    (
        "tr-cron-unknown-macro",
        with_(TR, "spec.schedule", "@reboot"),
        ("spec.schedule", "@reboot is not a cron schedule"),
    ),
    (
        "tr-credentials-secret-bad-name",
        with_(TR, "spec.data.credentialsSecret", "Bad_Name"),
        ("spec.data.credentialsSecret", "should match"),
    ),
    (
        "tr-credentials-secret-254-chars",
        with_(TR, "spec.data.credentialsSecret", "s" * 254),
        ("spec.data.credentialsSecret", "Too long"),
    ),
    (
        "tr-credentials-secret-object",
        with_(TR, "spec.data.credentialsSecret", {"name": "creds", "namespace": "other"}),
        # the old {name: ...} shape: strict decoding refuses it before the schema does
        ('unknown field "spec.data.credentialsSecret.name"',),
    ),
    ("tr-zero-timeout", with_(TR, "spec.timeout", "0s"), ("spec.timeout", "at least 1s")),
    (
        "tr-accuracy-gate-over-1",
        with_(TR, "spec.evaluation", {"gates": [{"metric": "accuracy", "value": 1.5}]}),
        (
            "spec.evaluation.gates[0].value",
            "accuracy is a fraction: a gate on it needs a value in 0..1",
        ),
    ),
    (
        "tr-negative-rmse-gate",
        with_(TR, "spec.evaluation", {"gates": [{"metric": "rmse", "op": "<", "value": -1}]}),
        ("spec.evaluation.gates[0].value", "rmse is never negative"),
    ),
    (
        "tr-r2-gate-over-1",
        with_(TR, "spec.evaluation", {"gates": [{"metric": "r2", "value": 1.2}]}),
        ("spec.evaluation.gates[0].value", "r2 is at most 1"),
    ),
    (
        "tr-ndcg-gate-over-1",
        with_(
            with_(TR, "spec.data.groupColumn", "query_id"),
            "spec.evaluation",
            {"gates": [{"metric": "ndcg_at_k", "value": 1.5}]},
        ),
        ("spec.evaluation.gates[0].value", "ndcg_at_k is a fraction"),
    ),
    (
        "tr-ranking-gate-without-group-column",
        with_(TR, "spec.evaluation", {"gates": [{"metric": "map_at_k", "value": 0.5}]}),
        ("spec.evaluation.gates", "needs data.groupColumn"),
    ),
    (
        "tr-ranking-without-group-column",
        with_(TR, "spec.evaluation", {"ranking": {"k": 5}}),
        ("spec.evaluation.ranking", "needs data.groupColumn"),
    ),
    (
        "tr-ranking-k-0",
        with_(
            with_(TR, "spec.data.groupColumn", "query_id"), "spec.evaluation", {"ranking": {"k": 0}}
        ),
        ("spec.evaluation.ranking.k", "greater than or equal to 1"),
    ),
    (
        "tr-group-column-is-the-target",
        with_(TR, "spec.data.groupColumn", "target"),
        ("spec.data.groupColumn", "cannot also be the target"),
    ),
    (
        "tr-counterfactuals-for-regression",
        with_(
            with_(TR, "spec.data.task", "regression"), "spec.explanation", {"counterfactuals": True}
        ),
        ("spec.explanation.counterfactuals", "need data.task: classification"),
    ),
    (
        "tr-lime-without-an-explain-step",
        with_(TR, "spec.explanation", {"method": "none", "lime": True}),
        ("spec.explanation.method", "which method: none turns off"),
    ),
    (
        "tr-group-column-in-features",
        with_(
            with_(TR, "spec.data.groupColumn", "query_id"), "spec.data.features", ["x", "query_id"]
        ),
        ("spec.data.groupColumn", "leave it out of data.features"),
    ),
    (
        "tr-fit-gate-unknown-verdict",
        with_(TR, "spec.evaluation", {"fitGate": {"reject": ["good fit"]}}),
        ("spec.evaluation.fitGate.reject[0]", "Unsupported value"),
    ),
    (
        "tr-fit-gate-repeated-verdict",
        with_(TR, "spec.evaluation", {"fitGate": {"reject": ["overfit", "overfit"]}}),
        ("spec.evaluation.fitGate", "reject must not repeat"),
    ),
    (
        "tr-fit-gate-rejects-nothing",
        with_(TR, "spec.evaluation", {"fitGate": {"reject": []}}),
        ("spec.evaluation.fitGate.reject", "should have at least 1 items"),
    ),
    (
        "tr-cmaes-with-categorical-parameters-only",
        with_(
            with_(TR, "spec.tuning.algorithm", "cmaes"),
            "spec.tuning.searchSpace",
            [{"name": "optimizer", "type": "categorical", "values": ["adam", "sgd"]}],
        ),
        ("spec.tuning.searchSpace", "algorithm cmaes (CMA-ES) searches int and float"),
    ),
    (
        "tr-family-unknown",
        with_(TR, "spec.model.family", "xgboost"),
        ("spec.model.family", "Unsupported value"),
    ),
    (
        "tr-trees-num-leaves-1",
        with_(TR, "spec.model", {"family": "lightgbm", "trees": {"numLeaves": 1}}),
        ("spec.model.trees.numLeaves", "greater than or equal to 2"),
    ),
    (
        "tr-fit-gate-without-learning-curves",
        with_(TR, "spec.evaluation", {"learningCurves": False, "fitGate": {}}),
        ("spec.evaluation.fitGate", "needs learningCurves: true"),
    ),
    (
        "tr-gate-value-string",
        with_(TR, "spec.evaluation", {"gates": [{"metric": "f1", "value": "high"}]}),
        ("spec.evaluation.gates[0].value", "must be of type number"),
    ),
    (
        "tr-gate-value-oversized",
        with_(TR, "spec.evaluation", {"gates": [{"metric": "size_mb", "value": 1e10}]}),
        ("spec.evaluation.gates[0].value", "less than or equal to 1e+09"),
    ),
    (
        "tr-zero-width-layer",
        with_(TR, "spec.model", {"hiddenLayers": [64, 0]}),
        ("spec.model.hiddenLayers[1]", "greater than or equal to 1"),
    ),
    (
        "tr-oversized-min-delta",
        with_(TR, "spec.model", {"earlyStopping": {"minDelta": 1e7}}),
        ("spec.model.earlyStopping.minDelta", "less than or equal to"),
    ),
    (
        "md-zero-interval",
        with_(MD, "spec.rollout", {"interval": "0s"}),
        ("spec.rollout.interval", "must be at least 1s, not 0s"),
    ),
    (
        "md-500ms-interval",
        with_(MD, "spec.rollout", {"interval": "500ms"}),
        ("spec.rollout.interval", "must be at least 1s, not 500ms"),
    ),
    (
        "md-zero-max-duration",
        with_(MD, "spec.rollout", {"maxDuration": "0s"}),
        ("spec.rollout.maxDuration", "at least 1s"),
    ),
    (
        "md-sub-second-flush-interval",
        with_(MD, "spec.serving", {"monitoring": {"requestLog": {"flushInterval": "999ms"}}}),
        ("spec.serving.monitoring.requestLog.flushInterval", "at least 1s"),
    ),
    (
        "md-zero-feedback-ttl",
        with_(MD, "spec.serving", {"monitoring": {"feedbackTtl": "0s"}}),
        ("spec.serving.monitoring.feedbackTtl", "at least 1s"),
    ),
    (
        "md-error-rate-string",
        with_(MD, "spec.rollout", {"analysis": {"maxErrorRate": "1%"}}),
        ("spec.rollout.analysis.maxErrorRate", "must be of type number"),
    ),
    (
        "md-error-rate-over-1",
        with_(MD, "spec.rollout", {"analysis": {"maxErrorRate": 1.5}}),
        ("spec.rollout.analysis.maxErrorRate", "less than or equal to 1"),
    ),
    (
        "md-zero-labelled-rows",
        with_(MD, "spec.rollout", {"analysis": {"minLabelledRows": 0}}),
        ("spec.rollout.analysis.minLabelledRows", "greater than or equal to 1"),
    ),
    (
        "md-oversized-metric-bound",
        with_(
            MD,
            "spec.rollout",
            {"analysis": {"metrics": [{"name": "mem", "query": "up", "max": 1e16}]}},
        ),
        ("spec.rollout.analysis.metrics[0].max", "less than or equal to 1e+15"),
    ),
    (
        "dp-threshold-AUTO",
        with_(DP, "spec.signals", [{"name": "p", "type": "prediction", "threshold": "AUTO"}]),
        ("spec.signals[0].threshold", "should match '^auto$'"),
    ),
    (
        "dp-negative-threshold",
        with_(DP, "spec.signals", [{"name": "p", "type": "prediction", "threshold": -0.1}]),
        ("spec.signals[0].threshold", "greater than or equal to 0"),
    ),
    (
        "dp-accuracy-threshold-over-1",
        with_(DP, "spec.signals", [{"name": "a", "type": "accuracy", "threshold": 1.5}]),
        ("spec.signals[0].threshold", "less than or equal to 1"),
    ),
    (
        "dp-f1-threshold-over-1",
        with_(DP, "spec.signals", [{"name": "f", "type": "f1", "threshold": 2}]),
        ("spec.signals[0].threshold", "less than or equal to 1"),
    ),
    (
        "dp-oversized-threshold",
        with_(
            DP, "spec.signals", [{"name": "q", "type": "promql", "query": "up", "threshold": 1e16}]
        ),
        ("spec.signals[0].threshold", "less than or equal to 1e+15"),
    ),
    (
        "dp-threshold-list",
        with_(DP, "spec.signals", [{"name": "p", "type": "prediction", "threshold": [0.2]}]),
        ("spec.signals[0].threshold", "must have at most 0 items"),
    ),
    (
        "dp-threshold-map",
        with_(DP, "spec.signals", [{"name": "p", "type": "prediction", "threshold": {"v": 1}}]),
        ("spec.signals[0].threshold",),
    ),
    (
        "dp-threshold-boolean",
        with_(DP, "spec.signals", [{"name": "p", "type": "prediction", "threshold": True}]),
        ('"spec.signals[0].threshold" must not validate the schema (not)',),
    ),
    (
        "dp-threshold-numeric-string",
        with_(DP, "spec.signals", [{"name": "p", "type": "prediction", "threshold": "0.2"}]),
        ("spec.signals[0].threshold", "should match '^auto$'"),
    ),
    (
        "dp-500ms-interval",
        with_(DP, "spec.interval", "500ms"),
        ("spec.interval", "must be at least 1s, not 500ms"),
    ),
    (
        "dp-zero-cooldown",
        with_(DP, "spec.action", {"cooldown": "0s"}),
        ("spec.action.cooldown", "at least 1s"),
    ),
    (
        "dp-false-alarm-rate-over-limit",
        with_(
            DP,
            "spec.signals",
            [{"name": "p", "type": "prediction", "threshold": "auto", "falseAlarmRate": 0.5}],
        ),
        ("spec.signals[0].falseAlarmRate", "less than or equal to 0.2"),
    ),
    (
        "dp-zero-min-count",
        with_(
            DP,
            "spec.signals",
            [{"name": "p", "type": "prediction", "threshold": 0.1, "minCount": 0}],
        ),
        ("spec.signals[0].minCount", "greater than or equal to 1"),
    ),
    (
        "mv-fraction-over-1",
        with_(MV, "spec.predictionReference", {"edges": [0, 1], "fractions": [1.5, 0]}),
        ("spec.predictionReference.fractions[0]", "less than or equal to 1"),
    ),
]
BAD += BOUNDS


@pytest.mark.parametrize(
    ("obj", "expected"), [(o, e) for _, o, e in BAD], ids=[i for i, _, _ in BAD]
)
async def test_bad_resource_is_rejected_by_the_api_server(
    kube: KubeClient, namespace: str, obj: dict[str, Any], expected: tuple[str, ...]
) -> None:
    kind: Kind = KINDS[obj["kind"]]
    with pytest.raises(ApiError) as info:
        # Strict field validation, as kubectl does by default.
        await kube.request(
            "POST", kind.path(namespace), body=obj, params={"fieldValidation": "Strict"}
        )
    # 422 for schema/CEL failures, 400 for strict decoding of unknown fields.
    assert info.value.status in (400, 422), info.value
    for text in expected:
        assert text in info.value.message, info.value.message


# Values at the edge of each new bound, which the API server must still accept.
GOOD: list[tuple[str, dict[str, Any]]] = [
    (
        "cron-names-and-steps",
        with_(TR, "spec.schedule", "*/15 8-18 * jan-jun MON-FRI"),
    ),
    ("cron-nth-weekday", with_(TR, "spec.schedule", "0 3 ? * 5#3")),
    ("cron-tab-separated", with_(TR, "spec.schedule", "0\t3 * * *")),
    ("cron-macro", with_(TR, "spec.schedule", "@midnight")),
    (
        "label-keys-at-their-limits",
        with_(
            TR,
            "spec.resources",
            {
                "nodeSelector": {
                    "a" * 253 + "/" + "n" * 63: "v" * 63,
                    "kubernetes.io/arch": "amd64",
                    "Zone_1.a": "",
                },
                "tolerations": [{"operator": "Exists"}, {"key": "nvidia.com/gpu", "value": "x"}],
            },
        ),
    ),
    ("credentials-secret", with_(TR, "spec.data.credentialsSecret", "s3.creds-1")),
    (
        "gates-at-their-limits",
        with_(
            TR,
            "spec.evaluation",
            {
                "gates": [
                    {"metric": "accuracy", "value": 1},
                    {"metric": "f1", "value": 0},
                    {"metric": "r2", "value": -3.5},
                    {"metric": "latency_ms", "op": "<", "value": 0},
                ]
            },
        ),
    ),
    (
        "ranking-gates-and-fit-gate",
        with_(
            with_(TR, "spec.data.groupColumn", "query_id"),
            "spec.evaluation",
            {
                "gates": [
                    {"metric": "ndcg_at_k", "value": 1},
                    {"metric": "map_at_k", "value": 0},
                ],
                "ranking": {"k": 1000},
                "fitGate": {"reject": ["overfit", "underfit"]},
            },
        ),
    ),
    ("fit-gate-defaults", with_(TR, "spec.evaluation", {"fitGate": {}})),
    ("timeout-1s", with_(TR, "spec.timeout", "1s")),
    ("rollout-interval-1.5s", with_(MD, "spec.rollout", {"interval": "1.5s"})),
    (
        "thresholds-at-their-limits",
        with_(
            DP,
            "spec.signals",
            [
                {"name": "a", "type": "accuracy", "threshold": 1},
                {"name": "b", "type": "f1", "threshold": 0},
                {"name": "c", "type": "psi", "feature": "*", "threshold": 3.5},
                {"name": "d", "type": "promql", "query": "up", "threshold": 1e15},
                {"name": "e", "type": "accuracy", "threshold": "auto"},
            ],
        ),
    ),
    ("for-0s-acts-at-once", with_(DP, "spec.for", "0s")),
    ("interval-1s", with_(with_(DP, "spec.interval", "1s"), "spec.window", "1s")),
]


@pytest.mark.parametrize("obj", [o for _, o in GOOD], ids=[i for i, _ in GOOD])
async def test_values_at_the_bounds_are_accepted(
    kube: KubeClient, namespace: str, obj: dict[str, Any]
) -> None:
    out = await kube.request(
        "POST", KINDS[obj["kind"]].path(namespace), body=obj, params={"fieldValidation": "Strict"}
    )
    assert out["metadata"]["name"] == obj["metadata"]["name"]


async def test_examples_are_accepted(kube: KubeClient, namespace: str) -> None:
    created = []
    for doc in load_examples():
        out = await kube.request(
            "POST",
            KINDS[doc["kind"]].path(namespace),
            body=doc,
            params={"fieldValidation": "Strict"},
        )
        created.append(out["metadata"]["name"])
    assert len(created) == len(load_examples()) >= 5


async def test_model_version_core_fields_are_immutable(kube: KubeClient, namespace: str) -> None:
    await kube.create(MODEL_VERSIONS, namespace, MV)
    with pytest.raises(ApiError) as info:
        await kube.patch(
            MODEL_VERSIONS,
            namespace,
            "m-v1",
            {"spec": {"artifact": {"uri": "s3://bucket/models/m/2"}}},
        )
    assert info.value.status == 422
    assert "modelName, version, artifact, task and framework are immutable" in info.value.message
    # Aliases stay mutable.
    out = await kube.patch(MODEL_VERSIONS, namespace, "m-v1", {"spec": {"aliases": ["latest"]}})
    assert out["spec"]["aliases"] == ["latest"]


async def test_defaults_are_applied_by_the_api_server(kube: KubeClient, namespace: str) -> None:
    out = await kube.create(MODEL_DEPLOYMENTS, namespace, MD)
    assert out["spec"]["rollout"]["steps"] == [10, 25, 50, 100]
    assert out["spec"]["serving"]["protocol"] == "v2"
