{{- define "fold-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fold-node.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fold-node.headless" -}}
{{- printf "%s-headless" (include "fold-node.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fold-node.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fold-node.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fold-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fold-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fold-node.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The bootstrap multiaddrs: every pod of the StatefulSet by its stable DNS name. */}}
{{- define "fold-node.bootstrap" -}}
{{- $full := include "fold-node.fullname" . -}}
{{- $svc := include "fold-node.headless" . -}}
{{- $addrs := list -}}
{{- range $i := until (int .Values.replicaCount) -}}
{{- $addrs = append $addrs (printf "/dns4/%s-%d.%s.%s.svc.cluster.local/tcp/%d" $full $i $svc $.Release.Namespace (int $.Values.sidecar.p2pPort)) -}}
{{- end -}}
{{- range .Values.sidecar.extraBootstrap -}}
{{- $addrs = append $addrs . -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end -}}

{{- define "fold-node.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* fold-node's memory, request and limit alike: its page cache plus the measured overhead. */}}
{{- define "fold-node.nodeMemory" -}}
{{- printf "%dMi" (add (int .Values.node.cacheSizeMiB) (int .Values.node.memoryOverheadMiB)) -}}
{{- end -}}

{{/* fold-node's resources: node.resources (cpu and the like) with the memory from the cache. */}}
{{- define "fold-node.nodeResources" -}}
{{- $mem := include "fold-node.nodeMemory" . -}}
{{- $r := .Values.node.resources | default dict -}}
{{- if or (hasKey ($r.requests | default dict) "memory") (hasKey ($r.limits | default dict) "memory") -}}
{{- fail "node.resources must not set memory: the chart sets fold-node's memory request and limit to node.cacheSizeMiB + node.memoryOverheadMiB, so the cache and the limit cannot drift apart; change those values instead" -}}
{{- end -}}
{{- $requests := merge (dict "memory" $mem) (deepCopy ($r.requests | default dict)) -}}
{{- $limits := merge (dict "memory" $mem) (deepCopy ($r.limits | default dict)) -}}
{{- toYaml (dict "requests" $requests "limits" $limits) -}}
{{- end -}}
