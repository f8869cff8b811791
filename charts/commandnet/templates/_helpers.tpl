{{/*
Names and labels, as `helm create` makes them.
*/}}
{{- define "commandnet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "commandnet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "commandnet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "commandnet.labels" -}}
helm.sh/chart: {{ include "commandnet.chart" . }}
{{ include "commandnet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: commandnet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "commandnet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "commandnet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* A name of at most 63 characters: "<fullname>-<suffix>". */}}
{{- define "commandnet.componentName" -}}
{{- printf "%s-%s" (include "commandnet.fullname" .root) .suffix | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A pool's settings: the chart-wide `workers` defaults with the pool's own keys over them.
Maps (resources, pdb, nodeSelector...) are merged one level deep, key by key; everything else
(lists, numbers, booleans, null) given by the pool replaces the default. Call with
(dict "root" $ "pool" $pool); returns YAML (use fromYaml).
*/}}
{{- define "commandnet.pool" -}}
{{- $pool := deepCopy .root.Values.workers }}
{{- range $key, $value := .pool }}
{{- $default := get $pool $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $default) }}
{{- /* one level deep, key by key: false, 0 and null given by the pool win too */}}
{{- range $k, $v := $value }}
{{- $_ := set $default $k $v }}
{{- end }}
{{- else }}
{{- $_ := set $pool $key $value }}
{{- end }}
{{- end }}
{{- toYaml $pool }}
{{- end }}

{{/* "<fullname>-<pool>": the pool's Deployment, Service and PodDisruptionBudget. */}}
{{- define "commandnet.poolName" -}}
{{- include "commandnet.componentName" (dict "root" .root "suffix" .pool.name) }}
{{- end }}

{{/* Selector labels of one pool's pods. */}}
{{- define "commandnet.poolSelectorLabels" -}}
{{ include "commandnet.selectorLabels" .root }}
app.kubernetes.io/component: worker
commandnet.io/pool: {{ .pool.name }}
{{- end }}

{{- define "commandnet.workerServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "commandnet.componentName" (dict "root" . "suffix" "worker")) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "commandnet.operatorName" -}}
{{- include "commandnet.componentName" (dict "root" . "suffix" "operator") }}
{{- end }}

{{- define "commandnet.operatorSelectorLabels" -}}
{{ include "commandnet.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "commandnet.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "commandnet.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "commandnet.webhookSecretName" -}}
{{- include "commandnet.componentName" (dict "root" . "suffix" "webhook-tls") }}
{{- end }}

{{/* "repository:tag", the tag defaulting to the chart's appVersion. Call with (dict "image" .. "root" $). */}}
{{- define "commandnet.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "commandnet.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The connection Secret's name; installing without one fails with this message. */}}
{{- define "commandnet.connectionSecret" -}}
{{- required "connection.existingSecret is required: create a Secret with the PostgreSQL URL and the NATS URL (kubectl create secret generic commandnet-connection --from-literal=store-url=postgresql://USER:PASSWORD@HOST:5432/DB --from-literal=bus-url=nats://HOST:4222) and install with --set connection.existingSecret=commandnet-connection" .Values.connection.existingSecret }}
{{- end }}

{{/* One env var from the connection Secret. Call with (dict "root" $ "name" "COMMANDNET_X" "key" "k"). */}}
{{- define "commandnet.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "commandnet.connectionSecret" .root }}
      key: {{ .key }}
{{- end }}

{{/* The bus's URL and credentials (workers, setup hook, operator). */}}
{{- define "commandnet.busEnv" -}}
{{- $c := .Values.connection }}
{{ include "commandnet.secretEnv" (dict "root" . "name" "COMMANDNET_BUS_URL" "key" $c.busUrlKey) }}
{{- if $c.busPasswordKey }}
{{ include "commandnet.secretEnv" (dict "root" . "name" "COMMANDNET_BUS_PASSWORD" "key" $c.busPasswordKey) }}
{{- end }}
{{- if $c.busTokenKey }}
{{ include "commandnet.secretEnv" (dict "root" . "name" "COMMANDNET_BUS_TOKEN" "key" $c.busTokenKey) }}
{{- end }}
{{- if $c.busCredsKey }}
- name: COMMANDNET_BUS_CREDS_FILE
  value: /etc/commandnet/connection/bus.creds
{{- end }}
{{- end }}

{{/* The store's URL and password, then the bus (workers, setup hook). */}}
{{- define "commandnet.connectionEnv" -}}
{{- $c := .Values.connection }}
{{ include "commandnet.secretEnv" (dict "root" . "name" "COMMANDNET_STORE_URL" "key" $c.storeUrlKey) }}
{{- if $c.storePasswordKey }}
{{ include "commandnet.secretEnv" (dict "root" . "name" "COMMANDNET_STORE_PASSWORD" "key" $c.storePasswordKey) }}
{{- end }}
{{ include "commandnet.busEnv" . | trim }}
{{- end }}

{{/* Volume and mount of the NATS .creds file, when connection.busCredsKey is set. */}}
{{- define "commandnet.credsVolume" -}}
{{- if .Values.connection.busCredsKey }}
- name: connection
  secret:
    secretName: {{ include "commandnet.connectionSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.connection.busCredsKey }}
        path: bus.creds
{{- end }}
{{- end }}

{{- define "commandnet.credsVolumeMount" -}}
{{- if .Values.connection.busCredsKey }}
- name: connection
  mountPath: /etc/commandnet/connection
  readOnly: true
{{- end }}
{{- end }}

{{/*
The webhook's CA and serving certificate, made once per render and shared by the templates
that need them (the TLS Secret, both webhook configurations, the operator's checksum).
Kept across upgrades: when the Secret exists (lookup), its certificate is reused. `helm
template` (no cluster) makes a new one each time. Returns JSON (exact, unlike YAML, which
loses a PEM's last newline): ca, crt, key (PEM); use fromJson.
*/}}
{{- define "commandnet.webhookCerts" -}}
{{- $cache := .Values.operator.webhook }}
{{- if not (hasKey $cache "_generated") }}
{{- $secretName := include "commandnet.webhookSecretName" . }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $secretName }}
{{- $data := dict }}
{{- if and $existing (hasKey $existing "data") }}
{{- $d := $existing.data }}
{{- if and (hasKey $d "ca.crt") (hasKey $d "tls.crt") (hasKey $d "tls.key") }}
{{- $data = dict "ca" (index $d "ca.crt" | b64dec) "crt" (index $d "tls.crt" | b64dec) "key" (index $d "tls.key" | b64dec) }}
{{- end }}
{{- end }}
{{- if not $data }}
{{- $service := include "commandnet.operatorName" . }}
{{- $ns := .Release.Namespace }}
{{- $days := int .Values.operator.webhook.certificateValidityDays }}
{{- $ca := genCA (printf "%s-webhook-ca" $service) $days }}
{{- $hosts := list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns) }}
{{- $cert := genSignedCert (printf "%s.%s.svc" $service $ns) nil $hosts $days $ca }}
{{- $data = dict "ca" $ca.Cert "crt" $cert.Cert "key" $cert.Key }}
{{- end }}
{{- $_ := set $cache "_generated" $data }}
{{- end }}
{{- toJson (get $cache "_generated") }}
{{- end }}

{{/*
Which autoscaler owns a pool's scale: "hpa" (autoscaling), "keda" or "" (none: `replicas`).
The Deployment, HPA, ScaledObject and NOTES templates call it, so the checks no schema can make
(across keys) fail the same way everywhere, naming the pool. Call with (dict "root" $ "pool"
$pool), $pool merged.
*/}}
{{- define "commandnet.autoscaler" -}}
{{- $p := .pool }}
{{- $hpa := dig "autoscaling" "enabled" false $p }}
{{- $keda := dig "keda" "enabled" false $p }}
{{- if and $hpa $keda }}
{{- fail (printf "pool %q: autoscaling.enabled and keda.enabled are both true; choose one: the HorizontalPodAutoscaler (CPU/memory) or KEDA (the pool's JetStream backlog). Both would set the Deployment's replicas and fight over it (docs/autoscaling.md)" $p.name) }}
{{- else if $hpa }}
{{- $a := $p.autoscaling }}
{{- if gt (int64 $a.minReplicas) (int64 $a.maxReplicas) }}
{{- fail (printf "pool %q: autoscaling.minReplicas (%d) exceeds autoscaling.maxReplicas (%d)" $p.name (int64 $a.minReplicas) (int64 $a.maxReplicas)) }}
{{- end }}
{{- $cpu := not (kindIs "invalid" $a.targetCPUUtilizationPercentage) }}
{{- $memory := not (kindIs "invalid" $a.targetMemoryUtilizationPercentage) }}
{{- if not (or $cpu $memory) }}
{{- fail (printf "pool %q: autoscaling needs a metric: set targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or both" $p.name) }}
{{- end }}
{{- $requests := dig "resources" "requests" (dict) $p | default (dict) }}
{{- range $resource, $on := dict "cpu" $cpu "memory" $memory }}
{{- if and $on (not (hasKey $requests $resource)) }}
{{- fail (printf "pool %q: autoscaling on %s utilization needs resources.requests.%s (the percentage is of the request)" $p.name $resource $resource) }}
{{- end }}
{{- end }}
{{- print "hpa" }}
{{- else if $keda }}
{{- $k := $p.keda }}
{{- if gt (int64 $k.minReplicaCount) (int64 $k.maxReplicaCount) }}
{{- fail (printf "pool %q: keda.minReplicaCount (%d) exceeds keda.maxReplicaCount (%d)" $p.name (int64 $k.minReplicaCount) (int64 $k.maxReplicaCount)) }}
{{- end }}
{{- if not (or $k.natsServerMonitoringEndpoint $k.authenticationRef) }}
{{- fail (printf "pool %q: keda.natsServerMonitoringEndpoint is required: the host:port of the NATS monitoring endpoint KEDA reads /jsz from, e.g. nats.nats.svc:8222 (or give it through keda.authenticationRef)" $p.name) }}
{{- end }}
{{- $min := dig "pdb" "minAvailable" nil $p }}
{{- if and (eq (int64 $k.minReplicaCount) 0) (dig "pdb" "enabled" false $p) (or (kindIs "float64" $min) (kindIs "int64" $min) (kindIs "int" $min)) }}
{{- if gt (int64 $min) 0 }}
{{- fail (printf "pool %q: keda.minReplicaCount 0 scales the pool to zero, but pdb.minAvailable %d asks for pods that are then not there: use pdb.maxUnavailable (1 by default) or a percentage" $p.name (int64 $min)) }}
{{- end }}
{{- end }}
{{- print "keda" }}
{{- end }}
{{- end }}

{{/*
The JetStream stream and durable consumer a pool's workers consume: those JetStreamBus
(commandnet/adapters/nats.py) uses, stream "COMMANDNET" and a consumer named after the pool,
unless keda.stream / keda.consumer say otherwise. tests/test_chart.py checks these defaults
against the worker's own. Call with (dict "root" $ "pool" $pool); returns YAML.
*/}}
{{- define "commandnet.jetstreamNames" -}}
stream: {{ default "COMMANDNET" .pool.keda.stream | quote }}
consumer: {{ default .pool.name .pool.keda.consumer | quote }}
{{- end }}

{{/*
A pool's `replicas` field; nothing when an autoscaler owns the pool's scale, so that `helm
upgrade` does not reset it.
*/}}
{{- define "commandnet.workerReplicas" -}}
{{- if not (include "commandnet.autoscaler" .) }}
replicas: {{ int64 .pool.replicas }}
{{- end }}
{{- end }}

{{/* Spread a pool's pods: the pool's constraints (labelSelector defaulted), else over nodes. */}}
{{- define "commandnet.topologySpread" -}}
{{- $selector := include "commandnet.poolSelectorLabels" . | fromYaml }}
topologySpreadConstraints:
{{- if .pool.topologySpreadConstraints }}
{{- range .pool.topologySpreadConstraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $selector) }}
{{- end }}
- {{ toYaml $c | nindent 2 | trim }}
{{- end }}
{{- else }}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- toYaml $selector | nindent 6 }}
{{- end }}
{{- end }}

{{/* One step of the setup Job. Call with (dict "root" $ "step" (dict "name" .. "args" ..)). */}}
{{- define "commandnet.setupContainer" -}}
{{- $root := .root }}
- name: {{ .step.name }}
  image: {{ include "commandnet.image" (dict "image" $root.Values.image "root" $root) }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  args:
    {{- toYaml .step.args | nindent 4 }}
  env:
    {{- include "commandnet.connectionEnv" $root | trim | nindent 4 }}
    - name: HOME
      value: /tmp
    {{- with .step.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.setup.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- with include "commandnet.credsVolumeMount" $root }}{{ . | trim | nindent 4 }}{{- end }}
{{- end }}

{{/*
With operator.watchNamespaces, the webhooks see only the Agents of those namespaces: another
release's operator answers for the rest (kopf itself registers no selector: it watches all).
*/}}
{{- define "commandnet.webhookNamespaceSelector" -}}
{{- with .Values.operator.watchNamespaces }}
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: In
      values:
        {{- toYaml . | nindent 8 }}
{{- end }}
{{- end }}
