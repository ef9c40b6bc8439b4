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
