{{/*
Names: every object this chart creates is named after the release, so two releases
(in one namespace or in two) never share an object.
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "meshd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's objects: fullnameOverride, else the release name when it already holds
the chart's name ("meshd", "meshd-canary"), else "<release>-meshd". 63 characters at
most (a label value and a Service name must fit).
*/}}
{{- define "meshd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "meshd.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Cluster-scoped objects (ClusterRole, ClusterRoleBinding) also carry the namespace:
releases of one name in two namespaces must not share them.
*/}}
{{- define "meshd.clusterName" -}}
{{- printf "%s-%s" (include "meshd.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "meshd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* What selects this release's pods; never changes for a release (selectors are immutable). */}}
{{- define "meshd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshd.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{- define "meshd.labels" -}}
helm.sh/chart: {{ include "meshd.chart" . | quote }}
{{ include "meshd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: control-plane
app.kubernetes.io/part-of: meshd
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
{{- end }}

{{/*
One container argument, `--flag=value`, as a single YAML string whatever the value
holds (": ", "#", quotes, newlines): JSON strings are YAML strings.
*/}}
{{/*
"true" when meshd serves webhooks at all (injection, admission or both).
*/}}
{{- define "meshd.webhooks" -}}
{{- if or .Values.injection.enabled .Values.admission.enabled }}true{{ end }}
{{- end }}

{{- define "meshd.arg" -}}
{{- printf "--%s=%s" (index . 0) (index . 1) | toJson }}
{{- end }}

{{/*
The injection settings (meshd's InjectConfig, YAML), from the `injection` values.
*/}}
{{- define "meshd.injectConfig" -}}
{{- $proxy := .Values.injection.proxy -}}
proxyImage: {{ printf "%s:%s" $proxy.image.repository $proxy.image.tag | quote }}
imagePullPolicy: {{ $proxy.image.pullPolicy | quote }}
resources:
  {{- toYaml $proxy.resources | nindent 2 }}
initResources:
  {{- toYaml .Values.injection.init.resources | nindent 2 }}
logLevel: {{ $proxy.logLevel | quote }}
xdsAddress: {{ printf "%s.%s.svc:15012" (include "meshd.fullname" .) .Release.Namespace | quote }}
meshdNamespace: {{ .Release.Namespace | quote }}
trustDomain: {{ .Values.trustDomain | quote }}
tokenAudience: {{ .Values.tokenAudience | quote }}
defaultCapture: {{ .Values.injection.defaultCapture | quote }}
{{- end }}
