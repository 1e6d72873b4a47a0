{{/*
A worker pool's settings: the pool's own entry of workerPools over workerDefaults (Sprig's merge: the pool wins).
Call with (dict "root" . "pool" $entry); returns YAML, read back with fromYaml.
*/}}
{{- define "refinery.workerPool" -}}
{{- $pool := merge (deepCopy .pool) (deepCopy .root.Values.workerDefaults) }}
{{- $_ := required "every workerPools entry needs a name (a DNS label: it names the pool's Deployment)" $pool.name }}
{{- $_ := required (printf "workerPools %s: classes (resource classes, e.g. [cpu, cpu-x2] or [gpu-x4]) is required" $pool.name) $pool.classes }}
{{- toYaml $pool }}
{{- end }}

{{/* The Celery queue of a resource class (core/resources.py): `cpu` on the base queue, others on base.class.
Call with (list $class $root). */}}
{{- define "refinery.classQueue" -}}
{{- $class := index . 0 }}
{{- $root := index . 1 }}
{{- $base := $root.Values.config.queue }}
{{- if eq $class "cpu" }}{{ $base }}{{ else }}{{ printf "%s.%s" $base $class }}{{ end }}
{{- end }}

{{/*
A worker pool's Deployment: one Celery solo worker per pod (one job at a time) consuming the queues of the pool's
resource classes (REFINERY_WORKER_CLASSES). A pool with gpus > 0 runs the CUDA image with that many GPUs per pod.
A pool serving a multi-node class (`-nM`) gives each pod its pod IP as REFINERY_WORKER_ADDRESS (the other nodes
reach its rendezvous and ranks there) and opens the rendezvous port; it needs at least M pods.
Call with (dict "root" . "pool" $pool), $pool as refinery.workerPool renders it.
*/}}
{{- define "refinery.worker" -}}
{{- $root := .root }}
{{- $w := .pool }}
{{- $gpu := gt ($w.gpus | int) 0 }}
{{- $nodes := 1 }}
{{- range $class := $w.classes }}
{{- if contains "-n" $class }}
{{- $n := splitList "-n" $class | last | int }}
{{- if gt $n $nodes }}{{ $nodes = $n }}{{ end }}
{{- end }}
{{- end }}
{{- $multinode := gt $nodes 1 }}
{{- if and $multinode (not $w.keda.enabled) (lt ($w.replicaCount | int) $nodes) }}
{{- fail (printf "workerPools %s serves a %d-node class, so it needs replicaCount >= %d (one pod per node)" $w.name $nodes $nodes) }}
{{- end }}
{{- $component := printf "worker-%s" $w.name }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "refinery.fullname" $root }}-{{ $component }}
  labels:
    {{- include "refinery.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
spec:
  {{- if not $w.keda.enabled }}
  replicas: {{ $w.replicaCount | int64 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "refinery.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ $component }}
  {{- if $gpu }}
  # No surge: a new pod would wait for free GPUs while the old one holds them.
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
        app.kubernetes.io/component: {{ $component }}
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
          image: {{ include "refinery.image" (list (ternary $root.Values.image.workerGpu $root.Values.image.worker $gpu) $root) | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: ["celery", "-A", "workers.app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO"]
          envFrom:
            - configMapRef:
                name: {{ include "refinery.fullname" $root }}
          env:
            {{- include "refinery.secretEnv" (dict "root" $root "bootstrap" false) | nindent 12 }}
            - name: REFINERY_WORKER_CLASSES
              value: {{ join "," $w.classes | quote }}
            - name: REFINERY_DEVICE
              value: {{ ternary "cuda" "cpu" $gpu | quote }}
            - name: REFINERY_TORCH_THREADS
              value: {{ $w.torchThreads | int64 | quote }}
            {{- if $multinode }}
            - name: REFINERY_WORKER_ADDRESS
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            - name: REFINERY_RENDEZVOUS_PORT
              value: {{ $w.rendezvousPort | int64 | quote }}
            {{- end }}
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if $multinode }}
          ports:
            - name: rendezvous
              containerPort: {{ $w.rendezvousPort | int64 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- with omit ($w.resources.requests | default dict) "nvidia.com/gpu" }}
            requests:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            {{- if or $gpu (omit ($w.resources.limits | default dict) "nvidia.com/gpu") }}
            limits:
              {{- with omit ($w.resources.limits | default dict) "nvidia.com/gpu" }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              {{- if $gpu }}
              nvidia.com/gpu: {{ $w.gpus | int64 }}
              {{- end }}
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
