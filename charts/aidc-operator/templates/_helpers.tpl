{{/* Names and labels shared by every template. */}}
{{- define "aidc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aidc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "aidc.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "aidc.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "aidc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aidc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "aidc.labels" -}}
{{ include "aidc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aidc
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "aidc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aidc.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "aidc.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{- define "aidc.webhookService" -}}
{{ include "aidc.fullname" . }}-webhook
{{- end -}}

{{- define "aidc.webhookSecret" -}}
{{ include "aidc.fullname" . }}-webhook-cert
{{- end -}}

{{/* The generated serving certificate's DNS names (a JSON list), and every SAN it must carry: the
     Secret records the latter, and an upgrade asking for others reissues the certificate. */}}
{{- define "aidc.webhookCertDNSNames" -}}
{{- $svc := include "aidc.webhookService" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson -}}
{{- end -}}

{{- define "aidc.webhookCertSANs" -}}
{{- include "aidc.webhookCertDNSNames" . | fromJsonArray | join "," }};{{ .Values.webhook.certExtraIPs | join "," -}}
{{- end -}}

{{/*
RBAC rules for the namespaces the operator serves. docs/security.md lists each rule and why;
tests/integration/chart/test_rbac_matrix.py checks them with `kubectl auth can-i`.
*/}}
{{- define "aidc.rules.namespaced" -}}
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, watch, create, patch]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads/status]
  verbs: [patch]
- apiGroups: [aidc.dev]
  resources: [trainingjobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [aidc.dev]
  resources: [inferenceservices]
  verbs: [get, list, watch, patch]
- apiGroups: [aidc.dev]
  resources: [trainingjobs/status, inferenceservices/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete, patch]
- apiGroups: [""]
  resources: [pods/proxy]
  verbs: [get]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [list, watch, create]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles]
  verbs: [list, watch, create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings]
  verbs: [list, watch, create]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, create]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
{{- /* Weighted canaries (spec.canary.gateway; used only when the cluster serves the Gateway API). */}}
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes, grpcroutes]
  verbs: [list, watch, create, patch, delete]
{{- end -}}

{{- define "aidc.rules.cluster" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [list, watch]
{{- /* Kueue integration (used only when the cluster serves Kueue's API): the flavors an admitted gang
       is placed with, and the priority class a Workload is given. */}}
- apiGroups: [kueue.x-k8s.io]
  resources: [resourceflavors]
  verbs: [list, watch]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloadpriorityclasses]
  verbs: [get]
- apiGroups: [scheduling.k8s.io]
  resources: [priorityclasses]
  verbs: [get]
{{- if not .Values.watchNamespaces }}
{{- /* Cluster-wide kopf watches CRDs to notice its resources changing; with a fixed list of
       namespaces the operator disables that scanning (main.py), so it needs no CRD access. */}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}
{{- end -}}

{{- define "aidc.rules.peering" -}}
- apiGroups: [kopf.dev]
  resources: [{{ if .Values.watchNamespaces }}kopfpeerings{{ else }}clusterkopfpeerings{{ end }}]
  verbs: [get, list, watch, patch]
{{- end -}}
