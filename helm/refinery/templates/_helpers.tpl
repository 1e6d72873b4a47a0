{{/* Chart name. */}}
{{- define "refinery.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, at most 63 characters (leaving room for the component suffixes). */}}
{{- define "refinery.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "refinery.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "refinery.selectorLabels" -}}
app.kubernetes.io/name: {{ include "refinery.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "refinery.labels" -}}
helm.sh/chart: {{ include "refinery.chart" . }}
{{ include "refinery.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: refinery
{{- end }}

{{- define "refinery.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "refinery.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the workloads read: secrets.existingSecret, or the chart's own. */}}
{{- define "refinery.secretName" -}}
{{- default (include "refinery.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Image reference; call with (list .Values.image.api .). */}}
{{- define "refinery.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* Non-secret settings: the ConfigMap's data, and the migration Job's env (it runs before the ConfigMap exists). */}}
{{- define "refinery.config" -}}
REFINERY_HOME: /var/lib/refinery
REFINERY_STORAGE_URL: {{ .Values.storage.url | quote }}
REFINERY_QUEUE: {{ .Values.config.queue | quote }}
REFINERY_DATA_ROOTS: {{ .Values.config.dataRoots | quote }}
REFINERY_DEFAULT_MAX_SECONDS: {{ .Values.config.defaultMaxSeconds | int64 | quote }}
REFINERY_MAX_SECONDS_CAP: {{ .Values.config.maxSecondsCap | int64 | quote }}
REFINERY_MAX_ATTEMPTS: {{ .Values.config.maxAttempts | int64 | quote }}
REFINERY_LEASE_SECONDS: {{ .Values.config.leaseSeconds | quote }}
REFINERY_HEARTBEAT_SECONDS: {{ .Values.config.heartbeatSeconds | quote }}
REFINERY_MAX_UPLOAD_BYTES: {{ .Values.config.maxUploadBytes | int64 | quote }}
REFINERY_RATE_LIMIT_PER_MINUTE: {{ .Values.config.rateLimitPerMinute | int64 | quote }}
{{- with .Values.storage.s3 }}
{{- if .endpointUrl }}
FSSPEC_S3_ENDPOINT_URL: {{ .endpointUrl | quote }}
AWS_ENDPOINT_URL_S3: {{ .endpointUrl | quote }}
{{- end }}
{{- if .region }}
AWS_DEFAULT_REGION: {{ .region | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Settings from the Secret, as env entries. Call with (dict "root" . "bootstrap" true) for the API. */}}
{{- define "refinery.secretEnv" -}}
{{- $secret := include "refinery.secretName" .root -}}
- name: REFINERY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: database-url
- name: REFINERY_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: broker-url
{{- if .bootstrap }}
- name: REFINERY_BOOTSTRAP_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: bootstrap-token
      optional: true
{{- end }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: aws-access-key-id
      optional: true
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: aws-secret-access-key
      optional: true
{{- end }}

{{/* Volumes every Refinery pod mounts: writable /tmp and REFINERY_HOME under a read-only root, and /data. */}}
{{- define "refinery.volumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  {{- if .scratch }}
  emptyDir:
    sizeLimit: {{ .scratch }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- with .shm }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end }}
{{- if .root.Values.dataVolume.existingClaim }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .root.Values.dataVolume.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "refinery.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /var/lib/refinery
{{- if .shm }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- if .root.Values.dataVolume.existingClaim }}
- name: data
  mountPath: /data
  readOnly: true
{{- end }}
{{- end }}
