{{/* Names and labels shared by every template. */}}

{{- define "finetune-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "finetune-operator.labels" -}}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "finetune-operator.leaseName" -}}
{{- default (include "finetune-operator.fullname" .) .Values.leaderElection.name -}}
{{- end -}}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Rules the operator needs in every namespace it watches: exactly what the controller calls, nothing more.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
# The runtimes jobs name (spec.runtimeRef): read only.
- apiGroups: ["finetune.dev"]
  resources: ["finetuneruntimes"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch", "update"]
# Owner references with blockOwnerDeletion on the stage children need this.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# Per-stage report ConfigMaps (the trainer's progress channel).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# The per-job trainer ServiceAccount, Role and RoleBinding (the Role grants only get/patch on the job's report ConfigMaps).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "get", "delete"]
{{- if eq .Values.executor "local" }}
# The local executor runs the trainer with a token of the job's trainer ServiceAccount.
- apiGroups: [""]
  resources: ["serviceaccounts/token"]
  verbs: ["create"]
{{- end }}
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "get", "delete"]
# Events on FineTuneJobs; listing reads the Warning Events of a stage's stuck Ray pods (FailedMount, ...).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
# Why a stage's Ray pods do not start (scheduling, image pulls), named in status while they come up.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# Access modes of the `pvc://` claims a stage's pods share (a ReadWriteOnce claim cannot span nodes).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Existence checks of the Secrets a job names; values are never read into status, logs or events.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}
