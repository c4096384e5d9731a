{{/*
Naming, labels and small computed values shared by the templates.
Object names follow the upstream chart's scheme (so operators and dashboards
that look for them by pattern keep working): cluster-scoped RBAC and the
DaemonSet are named after the chart name, ServiceAccounts after the fullname.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "nvdra.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
`<release>-<name>`, or just the release name when it already contains the
name, or fullnameOverride; at most 63 characters (a DNS label).
*/}}
{{- define "nvdra.fullname" -}}
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

{{/* The namespace of every namespaced object: namespaceOverride or the release's. */}}
{{- define "nvdra.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{/* `<name>-<chart version>` for the helm.sh/chart label. */}}
{{- define "nvdra.chart" -}}
{{- printf "%s-%s" (include "nvdra.name" .) .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "nvdra.labels" -}}
helm.sh/chart: {{ include "nvdra.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{ include "nvdra.podLabels" . }}
{{- end -}}

{{/* Labels of every pod (and part of every object's labels). */}}
{{- define "nvdra.podLabels" -}}
app.kubernetes.io/name: {{ include "nvdra.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The selector of one component's pods: `<name>-component: <component>`, or
selectorLabelsOverride. Call with (dict "root" $ "component" "kubelet-plugin").
*/}}
{{- define "nvdra.selectorLabels" -}}
{{- if not (and (hasKey . "root") (hasKey . "component")) -}}
{{- fail "nvdra.selectorLabels needs a dict with keys root and component" -}}
{{- end -}}
{{- with .root.Values.selectorLabelsOverride -}}
{{ toYaml . }}
{{- else -}}
{{ include "nvdra.name" .root }}-component: {{ .component }}
{{- end -}}
{{- end -}}

{{/* `<repository>:<tag>`, the tag defaulting to `v<appVersion>`. */}}
{{- define "nvdra.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default (printf "v%s" .Chart.AppVersion)) -}}
{{- end -}}

{{/*
The kubelet plugin's ServiceAccount: `<base>-kubeletplugin`, where base is
serviceAccount.name, else `<fullname>-service-account` when the chart
creates it, else `default` (upstream's rule).
*/}}
{{- define "nvdra.kubeletPluginServiceAccountName" -}}
{{- $generated := ternary (printf "%s-service-account" (include "nvdra.fullname" .)) "default" (.Values.serviceAccount.create | default false) -}}
{{- printf "%s-kubeletplugin" (.Values.serviceAccount.name | default $generated) -}}
{{- end -}}

{{/* The kubelet plugin's ClusterRole. */}}
{{- define "nvdra.kubeletPluginClusterRoleName" -}}
{{- printf "%s-clusterrole-kubeletplugin" (include "nvdra.name" .) -}}
{{- end -}}

{{/* The featureGates map as `A=true,B=false` (sorted by name). */}}
{{- define "nvdra.featureGates" -}}
{{- $pairs := list -}}
{{- range $gate, $enabled := .Values.featureGates -}}
{{- $pairs = append $pairs (printf "%s=%v" $gate $enabled) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/*
logVerbosity (klog levels) as the agent's tracing filter (NVDRA_LOG). klog
always logs errors, warnings and level-0 info, and levels 1-2 are still
operator-facing (prepare/unprepare confirmations), hence info up to 2; 3-5
add debug detail from nvdra's own crates; 6+ (upstream: API round trips,
gRPC bodies) traces nvdra and logs the Kubernetes client's requests.
*/}}
{{- define "nvdra.logFilter" -}}
{{- $raw := toString .Values.logVerbosity -}}
{{- if not (regexMatch "^[0-9]+$" $raw) -}}
{{- fail (printf "logVerbosity must be a whole number 0 or greater (got %q); e.g. --set logVerbosity=4" $raw) -}}
{{- end -}}
{{- $v := atoi $raw -}}
{{- $crates := .crates | default (list "nvdra_agent" "nvdra_kubelet_plugin" "nvdra_gpu" "nvdra_api") -}}
{{- if le $v 2 -}}
info
{{- else if le $v 5 -}}
{{- $directives := list "info" -}}
{{- range $crates }}{{ $directives = append $directives (printf "%s=debug" .) }}{{ end -}}
{{- join "," $directives -}}
{{- else -}}
{{- $directives := list "info" "kube_client=debug" -}}
{{- range $crates }}{{ $directives = append $directives (printf "%s=trace" .) }}{{ end -}}
{{- join "," $directives -}}
{{- end -}}
{{- end -}}

{{/*
The port of an HTTP endpoint value (`:8080`, `0.0.0.0:8080`, `[::]:8080`),
for the container port and the probes. Call with (dict "value" V "key" "a.b"
"off" "x.enabled=false"): the key and the switch name the value in errors.
*/}}
{{- define "nvdra.endpointPort" -}}
{{- $endpoint := toString .value -}}
{{- $port := regexFind "[0-9]+$" $endpoint -}}
{{- if or (not (regexMatch ":[0-9]+$" $endpoint)) (lt (atoi $port) 1) (gt (atoi $port) 65535) -}}
{{- fail (printf "%s must end in :<port> with a port from 1 to 65535 (got %q); e.g. \":8080\", or set %s to serve no HTTP" .key $endpoint .off) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* The port of kubeletPlugin.metrics.gpuHttpEndpoint. */}}
{{- define "nvdra.gpuHttpPort" -}}
{{- include "nvdra.endpointPort" (dict "value" .Values.kubeletPlugin.metrics.gpuHttpEndpoint "key" "kubeletPlugin.metrics.gpuHttpEndpoint" "off" "kubeletPlugin.metrics.enabled=false") -}}
{{- end -}}

{{/* imagePullSecrets' names, comma-separated (for the daemons' DaemonSets). */}}
{{- define "nvdra.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}
