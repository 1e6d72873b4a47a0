{{/*
A worker Deployment: one Celery solo worker per pod (one job at a time) on the `refinery.jobs` queue.
Call with (dict "root" . "component" "worker" "values" .Values.worker "image" .Values.image.worker
"device" "cpu" "gpu" false "autoscaled" false).
*/}}
{{- define "refinery.worker" -}}
{{- $root := .root }}
{{- $w := .values }}
{{- $gpu := .gpu }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "refinery.fullname" $root }}-{{ .component }}
  labels:
    {{- include "refinery.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ $w.replicaCount | int64 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "refinery.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ .component }}
  {{- if $gpu }}
  # No surge: a new pod would wait for a free GPU while the old one holds it.
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 0
      maxUnavailable: 1
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "refinery.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
        {{- with $w.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "refinery.serviceAccountName" $root }}
      automountServiceAccountToken: false
      # Celery's warm shutdown lets the running job finish; past this the reaper re-queues it (resumes from its
      # newest checkpoint).
      terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds | int64 }}
      {{- if and $gpu $w.runtimeClassName }}
      runtimeClassName: {{ $w.runtimeClassName }}
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: worker
          image: {{ include "refinery.image" (list .image $root) | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: ["celery", "-A", "workers.app", "worker", "--pool=solo", "--concurrency=1", "-Q", "refinery.jobs", "--loglevel=INFO"]
          envFrom:
            - configMapRef:
                name: {{ include "refinery.fullname" $root }}
          env:
            {{- include "refinery.secretEnv" (dict "root" $root "bootstrap" false) | nindent 12 }}
            - name: REFINERY_DEVICE
              value: {{ .device | quote }}
            - name: REFINERY_TORCH_THREADS
              value: {{ $w.torchThreads | int64 | quote }}
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- if $gpu }}
            {{- with omit ($w.resources.requests | default dict) "nvidia.com/gpu" }}
            requests:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            limits:
              {{- with omit ($w.resources.limits | default dict) "nvidia.com/gpu" }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              nvidia.com/gpu: {{ $w.gpus | int64 }}
            {{- else }}
            {{- toYaml $w.resources | nindent 12 }}
            {{- end }}
          volumeMounts:
            {{- include "refinery.volumeMounts" (dict "root" $root "shm" $w.shmSizeLimit) | nindent 12 }}
      volumes:
        {{- include "refinery.volumes" (dict "root" $root "scratch" $w.scratchSizeLimit "shm" $w.shmSizeLimit) | nindent 8 }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
