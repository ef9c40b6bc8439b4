{{- define "kubeloop.name" -}}kubeloop{{- end -}}

{{- define "kubeloop.fullname" -}}
{{- if contains "kubeloop" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-kubeloop" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "kubeloop.labels" -}}
app.kubernetes.io/name: kubeloop
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubeloop.selectorLabels" -}}
app.kubernetes.io/name: kubeloop
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubeloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "kubeloop.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- /*
The operator's namespaced rights: exactly what the code calls (tests/unit/test_rbac_usage.py
derives it from the code and tests/integration/test_chart.py compares it with this render).
Cluster-wide mode grants them in a ClusterRole; namespaced mode in a Role per watched namespace.
*/}}
{{- define "kubeloop.operatorRules" -}}
# kopf watches the four kinds (list, watch) and patches finalizers and its progress
# annotations (patch); the handlers read, create and patch them beside it.
- apiGroups: [kubeloop.dev]
  resources: [trainingruns]
  verbs: [get, list, watch, create, patch]
- apiGroups: [kubeloop.dev]
  resources: [modelversions]
  verbs: [get, list, watch, create, patch]
- apiGroups: [kubeloop.dev]
  resources: [modeldeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [kubeloop.dev]
  resources: [driftpolicies]
  verbs: [list, watch, patch]
# Status is written in one merge patch per pass (and by kopf for patch.status).
- apiGroups: [kubeloop.dev]
  resources: [trainingruns/status, modelversions/status, modeldeployments/status, driftpolicies/status]
  verbs: [patch]
# Events for `kubectl describe` (kopf posts core/v1 Events; it never updates them).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# The registry index ConfigMap of each model, written by server-side apply: a PATCH, which the
# API server also authorises as a create while the ConfigMap does not exist yet.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, patch]
# Artifact checks (a pvc:// URI's claim exists) and the GPU budget (ResourceQuotas).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
- apiGroups: [""]
  resources: [resourcequotas]
  verbs: [list]
# The serving backend: one InferenceService per ModelDeployment, server-side applied.
- apiGroups: [serving.kserve.io]
  resources: [inferenceservices]
  verbs: [get, create, patch, delete]
{{- if include "kubeloop.namespaced" . }}
# Peering, per watched namespace: every replica lists and watches the namespace's KopfPeering
# and merge-patches its own keep-alive into it (the CRD has no status subresource).
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [list, watch, patch]
{{- end }}
{{- end -}}

{{- /* Cluster-scoped rights kopf needs, in every mode. */}}
{{- define "kubeloop.operatorClusterRules" -}}
# kopf notices CRDs installed or removed after it started (it reads, never writes, them).
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if include "kubeloop.namespaced" . }}
# Given namespaces, kopf lists and watches them to learn which exist (names only).
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- else }}
# Peering, cluster-wide: every replica lists and watches the ClusterKopfPeering and
# merge-patches its own keep-alive into it (the CRD has no status subresource).
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [list, watch, patch]
{{- end }}
{{- end -}}

{{- /*
The namespaces the operator watches: operator.watchNamespaces plus every tenant's namespace,
in that order without repeats (JSON; empty: the whole cluster). Everything that depends on the
mode (settings, Roles, the webhook's selector, the peering objects) reads this.
*/}}
{{- define "kubeloop.watchNamespaces" -}}
{{- $namespaces := list }}
{{- if .Values.operator.watchNamespaces }}
{{- $namespaces = .Values.operator.watchNamespaces }}
{{- range .Values.tenants }}{{- $namespaces = append $namespaces .name }}{{- end }}
{{- end }}
{{- $unique := list }}
{{- range $namespaces }}{{- if not (has . $unique) }}{{- $unique = append $unique . }}{{- end }}{{- end }}
{{- toJson $unique -}}
{{- end -}}

{{- /* "true" when the operator watches given namespaces, "" when it watches the cluster. */}}
{{- define "kubeloop.namespaced" -}}
{{- if .Values.operator.watchNamespaces }}true{{ end -}}
{{- end -}}

{{- /* operator.dataAllowlist with each tenant's dataPrefixes added under its name (JSON). */}}
{{- define "kubeloop.dataAllowlist" -}}
{{- $allow := deepCopy (.Values.operator.dataAllowlist | default dict) }}
{{- range .Values.tenants }}
{{- if .dataPrefixes }}
{{- $merged := concat (get $allow .name | default list) .dataPrefixes | uniq }}
{{- $_ := set $allow .name $merged }}
{{- end }}
{{- end }}
{{- toJson $allow -}}
{{- end -}}

{{- /* The aggregated tenant roles (rbac.yaml defines them, tenants.yaml binds them). */}}
{{- define "kubeloop.viewRole" -}}kubeloop-view{{- end -}}
{{- define "kubeloop.editRole" -}}kubeloop-edit{{- end -}}

{{- /* The webhook Service's DNS name, which its certificate is issued for. */}}
{{- define "kubeloop.webhookService" -}}{{ include "kubeloop.fullname" . }}-webhook{{- end -}}
