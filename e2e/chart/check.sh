#!/usr/bin/env bash
# Checks the nvdra Helm chart: lint, render-time guards, and the rendered
# contract (DeviceClass names and CEL, the kubelet plugin's identity and
# permissions, value-driven toggles).
#
# Usage:
#   e2e/chart/check.sh HELM [KUBECONFIG]
#
# With KUBECONFIG (e.g. from e2e/controlplane/up.sh), it also applies the CRDs
# and the whole rendered chart to that API server (server-side apply, so
# every object passes real validation), exercises the kubelet plugin's
# permissions by impersonating its ServiceAccount, and deletes everything
# again. kubectl comes from $KUBECTL, else the control plane binary's
# `kubectl` subcommand (e2e/.cache/bin/nvdra-controlplane), else PATH.
#
# Exits non-zero, naming every failed check, if anything is off.
set -uo pipefail

[[ $# -ge 1 && $# -le 2 ]] || { echo "usage: $0 HELM [KUBECONFIG]" >&2; exit 2; }
helm="$1"
kubeconfig="${2:-}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
chart="$repo/charts/nvdra"
ns=nvdra
release=t
# Helm built without version ldflags assumes Kubernetes v1.20 for `template`;
# the chart needs 1.34+.
kube_version=1.34.0
sa="$release-nvdra-service-account-kubeletplugin"

failures=0
pass() { printf 'ok   %s\n' "$1"; }
fail() {
	printf 'FAIL %s\n' "$1" >&2
	[[ $# -lt 2 ]] || printf '%s\n' "$2" | sed 's/^/     | /' >&2
	failures=$((failures + 1))
}

# render ARGS...: helm template with the common flags; stdout = manifests.
render() {
	"$helm" template "$release" "$chart" --namespace "$ns" --kube-version "$kube_version" "$@"
}
# ok_render ARGS...: renders with the GPU override (the minimal working set).
ok_render() { render --set gpuResourcesEnabledOverride=true "$@"; }

# expect_fail NAME MESSAGE ARGS...: rendering with ARGS fails, citing MESSAGE.
expect_fail() {
	local name="$1" message="$2" out
	shift 2
	if out="$(render "$@" 2>&1)"; then
		fail "$name: render succeeded, expected failure" "$out"
	elif [[ "$out" != *"$message"* ]]; then
		fail "$name: error does not say: $message" "$out"
	else
		pass "$name"
	fi
}

# expect_same NAME WANT GOT
expect_same() {
	if [[ "$2" == "$3" ]]; then
		pass "$1"
	else
		fail "$1" "$(diff <(printf '%s\n' "$2") <(printf '%s\n' "$3") | sed 's/^</want/; s/^>/got /')"
	fi
}

# expect_contains NAME NEEDLE HAYSTACK
expect_contains() {
	if [[ "$3" == *"$2"* ]]; then pass "$1"; else fail "$1: missing: $2"; fi
}
expect_absent() {
	if [[ "$3" != *"$2"* ]]; then pass "$1"; else fail "$1: unexpectedly present: $2"; fi
}

# class_table: `name | expression` per DeviceClass, from rendered YAML on stdin.
class_table() {
	awk '
		/^kind: / { kind = $2 }
		kind == "DeviceClass" && /^  name: / { name = $2 }
		kind == "DeviceClass" && /expression: / {
			sub(/^ *expression: "/, ""); sub(/"$/, ""); print name " | " $0
		}'
}

# kind_names KIND: names of the objects of KIND on stdin, one a line.
kind_names() {
	awk -v want="$1" '
		/^---/ { kind = "" }
		/^kind: / { kind = $2 }
		kind == want && /^  name: / { print $2 }'
}

# clusterrole_rules: the rule lines (comments dropped) of the ClusterRole on stdin.
clusterrole_rules() {
	awk '
		/^---/ { in_role = 0; in_rules = 0 }
		/^kind: ClusterRole$/ { in_role = 1 }
		in_role && /^rules:/ { in_rules = 1; next }
		in_rules && !/^ *#/ { print }'
}

# env_value NAME: the value of env var NAME in the rendered DaemonSet on stdin.
env_value() {
	awk -v want="$1" '
		$0 ~ "- name: " want "$" { found = 1; next }
		found && /value:/ { sub(/^ *value: /, ""); gsub(/"/, ""); print; exit }
		found { exit }'
}

### Lint ###################################################################

if out="$("$helm" lint "$chart" --namespace "$ns" --kube-version "$kube_version" \
	--set gpuResourcesEnabledOverride=true 2>&1)"; then
	pass "helm lint"
else
	fail "helm lint" "$out"
fi

### Guards #################################################################

expect_fail "guard: resources.gpus.enabled needs gpuResourcesEnabledOverride" \
	"resources.gpus.enabled=true requires gpuResourcesEnabledOverride=true"
expect_fail "guard: 'namespace' value is refused" \
	"the value 'namespace' (set to \"gpu\") is not supported" \
	--set gpuResourcesEnabledOverride=true --set namespace=gpu
expect_fail "guard: default namespace is refused" \
	"refusing to install into the 'default' namespace" \
	--set gpuResourcesEnabledOverride=true --namespace default
expect_fail "guard: nvidiaCtkPath is obsolete" \
	"the value 'nvidiaCtkPath' is obsolete" \
	--set gpuResourcesEnabledOverride=true --set nvidiaCtkPath=/usr/bin/nvidia-ctk
expect_fail "guard: only resource.k8s.io/v1" \
	"resourceApiVersion=\"resource.k8s.io/v1beta1\" is not supported" \
	--set gpuResourcesEnabledOverride=true --set resourceApiVersion=resource.k8s.io/v1beta1
expect_fail "guard: logVerbosity must be a number" \
	"logVerbosity must be a whole number 0 or greater (got \"loud\")" \
	--set gpuResourcesEnabledOverride=true --set logVerbosity=loud
expect_fail "guard: gpuHttpEndpoint needs a port" \
	"kubeletPlugin.metrics.gpuHttpEndpoint must end in :<port>" \
	--set gpuResourcesEnabledOverride=true --set kubeletPlugin.metrics.gpuHttpEndpoint=localhost
expect_fail "guard: a DaemonSet cannot both surge and be unavailable" \
	"sets both maxSurge (1) and maxUnavailable (100%)" \
	--set gpuResourcesEnabledOverride=true --set kubeletPlugin.updateStrategy.rollingUpdate.maxUnavailable=100%

# values.schema.json: unknown keys and wrong types fail with the key's path.
expect_fail "schema: logFormat is text or json" "at '/logFormat'" \
	--set gpuResourcesEnabledOverride=true --set logFormat=yaml
expect_fail "schema: a misspelt key is refused" \
	"at '/kubeletPlugin': additional properties 'metric' not allowed" \
	--set gpuResourcesEnabledOverride=true --set kubeletPlugin.metric.enabled=false
expect_fail "schema: an unknown top-level key is refused" \
	"additional properties 'featureGate' not allowed" \
	--set gpuResourcesEnabledOverride=true --set featureGate.MPSSupport=true
expect_fail "schema: a duration must be a string" \
	"at '/controller/leaderElection/leaseDuration': got number, want string" \
	--set gpuResourcesEnabledOverride=true --set controller.leaderElection.leaseDuration=15
expect_fail "schema: feature gates are booleans" \
	"at '/featureGates/MPSSupport'" \
	--set gpuResourcesEnabledOverride=true --set-string featureGates.MPSSupport=yes

for args in "--set allowDefaultNamespace=true --namespace default" \
	"--set namespaceOverride=default --namespace default" \
	"--set resourceApiVersion=resource.k8s.io/v1"; do
	# shellcheck disable=SC2086 # word splitting of $args is intended
	if out="$(ok_render $args 2>&1)"; then
		pass "renders with $args"
	else
		fail "renders with $args" "$out"
	fi
done

### Default render #########################################################

if ! default="$(ok_render 2>&1)"; then
	fail "default render" "$default"
	echo "$failures check(s) failed" >&2
	exit 1
fi

expect_same "five DeviceClasses with the upstream CEL" \
"gpu.nvidia.com | device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'gpu'
mig.nvidia.com | device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'mig'
vfio.gpu.nvidia.com | device.driver == 'gpu.nvidia.com' && device.attributes['gpu.nvidia.com'].type == 'vfio'
compute-domain-daemon.nvidia.com | device.driver == 'compute-domain.nvidia.com' && device.attributes['compute-domain.nvidia.com'].type == 'daemon'
compute-domain-default-channel.nvidia.com | device.driver == 'compute-domain.nvidia.com' && device.attributes['compute-domain.nvidia.com'].type == 'channel' && device.attributes['compute-domain.nvidia.com'].id == 0" \
	"$(class_table <<<"$default")"

gpu_class="$(ok_render --show-only templates/deviceclasses.yaml | awk '/^---/{n++} n==1')"
expect_contains "gpu.nvidia.com maps extended resource nvidia.com/gpu" \
	"extendedResourceName: nvidia.com/gpu" "$gpu_class"
expect_same "only gpu.nvidia.com has an extended resource" 1 \
	"$(grep -c 'extendedResourceName:' <<<"$default")"
expect_same "every DeviceClass is resource.k8s.io/v1" 5 \
	"$(grep -B0 -A1 '^apiVersion: resource.k8s.io/v1$' <<<"$default" | grep -c '^kind: DeviceClass$')"

kp_rbac="$(ok_render --show-only templates/rbac-kubeletplugin.yaml)"
expect_same "ServiceAccount name" "$sa" "$(kind_names ServiceAccount <<<"$kp_rbac")"
expect_same "DaemonSet runs as that ServiceAccount" "      serviceAccountName: $sa" \
	"$(ok_render --show-only templates/kubeletplugin.yaml | grep 'serviceAccountName:')"
expect_same "ClusterRole name" "nvdra-clusterrole-kubeletplugin" "$(kind_names ClusterRole <<<"$kp_rbac")"
expect_same "ClusterRole rules (least privilege)" \
'  - apiGroups: ["resource.k8s.io"]
    resources: ["resourceslices"]
    verbs: ["list", "watch", "create", "patch", "delete"]
  - apiGroups: ["resource.k8s.io"]
    resources: ["resourceclaims"]
    verbs: ["get", "list"]
  - apiGroups: [""]
    resources: ["nodes"]
    verbs: ["get", "patch"]
  - apiGroups: ["resource.nvidia.com"]
    resources: ["computedomains"]
    verbs: ["list", "watch"]' \
	"$(clusterrole_rules <<<"$kp_rbac")"
expect_contains "agent Role: cliques list and watch in the driver namespace" \
'  name: nvdra-role-kubeletplugin
  namespace: nvdra' "$kp_rbac"
expect_contains "agent Role: clique verbs" \
'    resources: ["computedomaincliques"]
    verbs: ["list", "watch"]' "$kp_rbac"

ctl="$(ok_render --show-only templates/controller.yaml)"
expect_same "controller ServiceAccount" "$release-nvdra-service-account-controller" \
	"$(kind_names ServiceAccount <<<"$ctl")"
expect_contains "controller Deployment runs nvdra-controller as it" \
"      serviceAccountName: $release-nvdra-service-account-controller" "$ctl"
expect_same "controller ClusterRole rules (least privilege)" \
'  - apiGroups: ["resource.nvidia.com"]
    resources: ["computedomains"]
    verbs: ["list", "watch", "patch"]
  - apiGroups: ["resource.nvidia.com"]
    resources: ["computedomains/status"]
    verbs: ["patch"]
  - apiGroups: ["resource.k8s.io"]
    resources: ["resourceclaimtemplates"]
    verbs: ["get", "list", "watch", "create", "patch", "delete"]
  - apiGroups: [""]
    resources: ["nodes"]
    verbs: ["list", "patch"]
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]' "$(clusterrole_rules <<<"$ctl")"
expect_same "controller's daemons get the chart image" 'ghcr.io/nvdra/nvdra:v0.1.0' \
	"$(env_value IMAGE_NAME <<<"$ctl")"
expect_same "daemons serve metrics on 8082 by default" '8082' \
	"$(env_value CD_DAEMON_METRICS_PORT <<<"$ctl")"
expect_same "daemonMetrics.enabled=false turns them off" '0' \
	"$(ok_render --set controller.daemonMetrics.enabled=false --show-only templates/controller.yaml |
		env_value CD_DAEMON_METRICS_PORT)"
expect_same "daemon pods are system-node-critical by default" 'system-node-critical' \
	"$(env_value CD_DAEMON_PRIORITY_CLASS_NAME <<<"$ctl")"
expect_same "daemonPriorityClassName reaches the controller" 'high' \
	"$(ok_render --set controller.daemonPriorityClassName=high --show-only templates/controller.yaml |
		env_value CD_DAEMON_PRIORITY_CLASS_NAME)"
daemon_rbac="$(ok_render --show-only templates/rbac-computedomain-daemon.yaml)"
expect_same "daemon ServiceAccount (fixed name the DaemonSets use)" \
	"compute-domain-daemon-service-account" "$(kind_names ServiceAccount <<<"$daemon_rbac")"
policies="$(ok_render --show-only templates/admission-policies.yaml)"
expect_same "admission policies: agent and daemon confinement" \
"nvdra-kubeletplugin-own-node
nvdra-compute-domain-daemon-own-row" "$(kind_names ValidatingAdmissionPolicy <<<"$policies")"
expect_same "admission policies: each bound, denying" 2 \
	"$(grep -c 'validationActions: \["Deny"\]' <<<"$policies")"
expect_contains "agent policy matches the agent's own ServiceAccount user" \
	"expression: request.userInfo.username == \"system:serviceaccount:$ns:$sa\"" "$policies"
expect_contains "daemon policy matches the daemons' ServiceAccount user" \
	"\"system:serviceaccount:$ns:compute-domain-daemon-service-account\"" "$policies"
expect_absent "admissionPolicies.enabled=false drops them" "ValidatingAdmissionPolicy" \
	"$(ok_render --set admissionPolicies.enabled=false)"
expect_absent "no daemon policy without ComputeDomains" "daemon-own-row" \
	"$(ok_render --set resources.computeDomains.enabled=false)"
netpol="$(ok_render --show-only templates/networkpolicies.yaml)"
expect_same "NetworkPolicies on by default: agent, controller, IMEX daemons" \
"nvdra-kubelet-plugin
nvdra-controller
nvdra-compute-domain-daemons" "$(kind_names NetworkPolicy <<<"$netpol")"
expect_same "every policy governs both directions" 3 \
	"$(grep -c 'policyTypes: \["Ingress", "Egress"\]' <<<"$netpol")"
expect_contains "daemons reach each other on nvidia-imex's ports" \
"        - { protocol: TCP, port: 50000 }
        - { protocol: TCP, port: 50005 }" "$netpol"
expect_contains "daemons may be scraped on their metrics port" \
"    - ports:
        - protocol: TCP
          port: 8082" "$(sed -n '/compute-domain-daemons/,$p' <<<"$netpol")"
expect_same "API server egress on 6443 for each" 3 "$(grep -c 'port: 6443$' <<<"$netpol")"
expect_contains "metrics off: no ingress for the agent" "  ingress: []" \
	"$(ok_render --set kubeletPlugin.metrics.enabled=false --show-only templates/networkpolicies.yaml)"
expect_contains "metricsFrom limits who may scrape" "kubernetes.io/metadata.name: monitoring" \
	"$(ok_render --set-json 'kubeletPlugin.networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]' \
		--show-only templates/networkpolicies.yaml)"
expect_absent "networkPolicy.enabled=false drops them" "kind: NetworkPolicy" \
	"$(ok_render --set kubeletPlugin.networkPolicy.enabled=false --set controller.networkPolicy.enabled=false)"
expect_contains "agent update surges (new pod beside the old, pod-UID sockets)" \
"  updateStrategy:
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0" "$(ok_render --show-only templates/kubeletplugin.yaml)"
expect_contains "upstream's 100% unavailable with maxSurge 0 still renders" "maxUnavailable: 100%" \
	"$(ok_render --set kubeletPlugin.updateStrategy.rollingUpdate.maxSurge=0 \
		--set kubeletPlugin.updateStrategy.rollingUpdate.maxUnavailable=100% --show-only templates/kubeletplugin.yaml)"
one="$(ok_render --show-only templates/controller.yaml)"
expect_same "one controller without leader election" "false" "$(env_value LEADER_ELECTION_ENABLED <<<"$one")"
expect_contains "... and never two at once during an update" "    type: Recreate" "$one"
two="$(ok_render --set controller.replicas=2 --show-only templates/controller.yaml)"
expect_same "two replicas turn leader election on" "true" "$(env_value LEADER_ELECTION_ENABLED <<<"$two")"
expect_absent "... and may roll" "type: Recreate" "$two"
expect_same "logFormat=json reaches the agent and the controller" 2 \
	"$(ok_render --set logFormat=json | grep -A1 -- '- name: NVDRA_LOG_FORMAT$' | grep -c 'value: "json"')"
dash="$(ok_render --set monitoring.grafanaDashboard.enabled=true --show-only templates/grafana-dashboard.yaml)"
expect_contains "dashboard ConfigMap carries the sidecar's label" '    grafana_dashboard: "1"' "$dash"
expect_contains "dashboard ConfigMap embeds dashboards/nvdra.json" '      "uid": "nvdra-overview",' "$dash"
expect_absent "no dashboard by default" "grafana-dashboard" "$default"
expect_same "agent and controller request 10m CPU, 64Mi and cap memory at 512Mi, no CPU limit" 2 \
	"$(grep -A6 '^          resources:$' <<<"$default" | grep -c 'memory: 512Mi')"
expect_absent "no CPU limit anywhere" "limits:
              cpu" "$default"
expect_absent "no PrometheusRule by default (needs the Operator's CRDs)" "kind: PrometheusRule" "$default"
rules="$(ok_render --set monitoring.prometheusRule.enabled=true --set-string monitoring.prometheusRule.labels.release=kube-prometheus \
	--show-only templates/prometheusrule.yaml)"
expect_contains "PrometheusRule carries the selector labels" "    release: kube-prometheus" "$rules"
if command -v promtool >/dev/null 2>&1; then
	rules_file="$(mktemp)"
	# The rule file is the object's spec, one level up.
	awk 'found { print substr($0, 3) } /^spec:$/ { found = 1 }' <<<"$rules" >"$rules_file"
	if out="$(promtool check rules "$rules_file" 2>&1)" && [[ "$out" == *"SUCCESS: 11 rules found"* ]]; then
		pass "promtool check rules: 11 alerts"
	else
		fail "promtool check rules" "$out"
	fi
	rm -f "$rules_file"
else
	fail "promtool check rules" "promtool not found: install Debian's prometheus package (scripts/test does)"
fi
binding="$(ok_render --show-only templates/rbac-kubeletplugin.yaml)"
expect_contains "ClusterRoleBinding binds the ClusterRole to the ServiceAccount" \
"subjects:
  - kind: ServiceAccount
    name: $sa
    namespace: $ns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: nvdra-clusterrole-kubeletplugin" "$binding"
expect_contains "events Role: events.k8s.io create/patch in default" \
'  name: nvdra-role-kubeletplugin-events
  namespace: default' "$binding"

ds="$(ok_render --show-only templates/kubeletplugin.yaml)"
expect_contains "DaemonSet container gpus runs nvdra-agent" \
'        - name: gpus
          image: ghcr.io/nvdra/nvdra:v0.1.0' "$ds"
expect_same "NODE_NAME from spec.nodeName" "spec.nodeName" \
	"$(grep -A3 -- '- name: NODE_NAME$' <<<"$ds" | awk '/fieldPath:/{print $2}')"
expect_same "POD_UID from metadata.uid" "metadata.uid" \
	"$(grep -A3 -- '- name: POD_UID$' <<<"$ds" | awk '/fieldPath:/{print $2}')"
expect_same "CDI_ROOT" "/var/run/cdi" "$(env_value CDI_ROOT <<<"$ds")"
expect_same "NVDRA_LOG for logVerbosity 4" \
	"info,nvdra_agent=debug,nvdra_kubelet_plugin=debug,nvdra_gpu=debug,nvdra_api=debug" \
	"$(env_value NVDRA_LOG <<<"$ds")"
expect_same "HTTP_ENDPOINT" ":8080" "$(env_value HTTP_ENDPOINT <<<"$ds")"
expect_same "probes on /livez and /readyz at 8080" \
"startupProbe /livez 8080
livenessProbe /livez 8080
readinessProbe /readyz 8080" \
	"$(awk '/Probe:$/{p=$1; sub(/:$/, "", p)} p && /path:/{path=$2} p && /port:/{print p, path, $2; p=""}' <<<"$ds")"
expect_absent "no FEATURE_GATES without featureGates" "FEATURE_GATES" "$ds"

### Value-driven variants ##################################################

no_cd="$(ok_render --set resources.computeDomains.enabled=false)"
expect_same "computeDomains.enabled=false drops the compute-domain classes" \
"gpu.nvidia.com
mig.nvidia.com
vfio.gpu.nvidia.com" "$(kind_names DeviceClass <<<"$no_cd")"

no_gpu="$(render --set resources.gpus.enabled=false)"
expect_same "gpus.enabled=false keeps only the compute-domain classes" \
"compute-domain-daemon.nvidia.com
compute-domain-default-channel.nvidia.com" "$(kind_names DeviceClass <<<"$no_gpu")"
expect_same "gpus.enabled=false: the agent serves compute domains only" 'false' \
	"$(render --set resources.gpus.enabled=false --show-only templates/kubeletplugin.yaml | env_value NVDRA_GPUS)"
neither="$(render --set resources.gpus.enabled=false --set resources.computeDomains.enabled=false)"
expect_absent "both drivers off renders no kubelet plugin" "kind: DaemonSet" "$neither"
expect_absent "both drivers off renders no RBAC" "kind: ClusterRole" "$neither"
expect_absent "computeDomains.enabled=false renders no controller" "kind: Deployment" "$no_cd"

named="$(ok_render --set serviceAccount.name=gpu-agent --show-only templates/rbac-kubeletplugin.yaml)"
expect_same "serviceAccount.name overrides the base name" "gpu-agent-kubeletplugin" \
	"$(kind_names ServiceAccount <<<"$named")"
byo="$(ok_render --set serviceAccount.create=false)"
expect_absent "serviceAccount.create=false renders no kubelet-plugin RBAC" "kind: ClusterRole" \
	"$(ok_render --set serviceAccount.create=false --show-only templates/rbac-kubeletplugin.yaml 2>/dev/null)"
expect_contains "serviceAccount.create=false runs as default-kubeletplugin" \
	"serviceAccountName: default-kubeletplugin" "$byo"

gates="$(ok_render --set featureGates.MPSSupport=false --set featureGates.DynamicMIG=true \
	--show-only templates/kubeletplugin.yaml)"
expect_same "FEATURE_GATES rendered sorted as A=true,B=false" "DynamicMIG=true,MPSSupport=false" \
	"$(env_value FEATURE_GATES <<<"$gates")"

for case in "0|info" "2|info" "5|info,nvdra_agent=debug,nvdra_kubelet_plugin=debug,nvdra_gpu=debug,nvdra_api=debug" \
	"6|info,kube_client=debug,nvdra_agent=trace,nvdra_kubelet_plugin=trace,nvdra_gpu=trace,nvdra_api=trace"; do
	level="${case%%|*}"
	expect_same "logVerbosity=$level maps to NVDRA_LOG" "${case#*|}" \
		"$(ok_render --set logVerbosity="$level" --show-only templates/kubeletplugin.yaml | env_value NVDRA_LOG)"
done

no_http="$(ok_render --set kubeletPlugin.metrics.enabled=false --show-only templates/kubeletplugin.yaml)"
expect_same "metrics.enabled=false turns HTTP off" "" "$(env_value HTTP_ENDPOINT <<<"$no_http")"
expect_absent "metrics.enabled=false drops the probes" "Probe:" "$no_http"

custom="$(ok_render --set image.tag=dev --set nvidiaDriverRoot=/run/nvidia/driver \
	--set kubeletPlugin.metrics.gpuHttpEndpoint=:9400 --show-only templates/kubeletplugin.yaml)"
expect_contains "image.tag overrides the tag" "image: ghcr.io/nvdra/nvdra:dev" "$custom"
expect_same "NVIDIA_DRIVER_ROOT from nvidiaDriverRoot" "/run/nvidia/driver" \
	"$(env_value NVIDIA_DRIVER_ROOT <<<"$custom")"
expect_contains "driver root mounted from nvidiaDriverRoot" 'path: "/run/nvidia/driver"' "$custom"
expect_contains "probe port follows gpuHttpEndpoint" "containerPort: 9400" "$custom"

passthrough="$(ok_render --set featureGates.PassthroughSupport=true \
	--show-only templates/kubeletplugin.yaml)"
expect_same "PassthroughSupport reads the host's procfs" "/host/proc" \
	"$(env_value NVDRA_PROC_ROOT <<<"$passthrough")"
expect_contains "PassthroughSupport mounts the host's /proc" "path: /proc" "$passthrough"
expect_absent "no host /proc without PassthroughSupport" "host-proc" "$custom"

### Against a real API server ##############################################

if [[ -n "$kubeconfig" ]]; then
	if [[ -n "${KUBECTL:-}" ]]; then
		read -r -a kubectl <<<"$KUBECTL"
	elif [[ -x "$repo/e2e/.cache/bin/nvdra-controlplane" ]]; then
		kubectl=("$repo/e2e/.cache/bin/nvdra-controlplane" kubectl)
	else
		kubectl=(kubectl)
	fi
	k() { "${kubectl[@]}" --kubeconfig "$kubeconfig" "$@"; }
	as_agent=(--as "system:serviceaccount:$ns:$sa")
	manifests="$(ok_render)"

	cleanup() {
		k delete --ignore-not-found --wait=false -f - <<<"$manifests" >/dev/null 2>&1
		k delete --ignore-not-found resourceslice chart-check-node-gpu.nvidia.com >/dev/null 2>&1
		k delete --ignore-not-found -f "$chart/crds/" >/dev/null 2>&1
		k delete --ignore-not-found namespace "$ns" --wait=false >/dev/null 2>&1
	}
	trap cleanup EXIT

	# run NAME CMD...: CMD succeeds.
	run() {
		local name="$1" out
		shift
		if out="$("$@" 2>&1)"; then pass "$name"; else fail "$name" "$out"; fi
	}
	# refused NAME CMD...: CMD fails with Forbidden.
	refused() {
		local name="$1" out
		shift
		if out="$("$@" 2>&1)"; then
			fail "$name: allowed, expected Forbidden" "$out"
		elif [[ "$out" != *Forbidden* && "$out" != *forbidden* ]]; then
			fail "$name: failed but not with Forbidden" "$out"
		else
			pass "$name"
		fi
	}

	run "namespace $ns" k create namespace "$ns"
	run "API server accepts the CRDs" k apply --server-side -f "$chart/crds/"
	run "API server accepts every rendered object" k apply --server-side -f - <<<"$manifests"
	run "extendedResourceName survives on the server" bash -c \
		"[[ \"\$(\"\$@\" get deviceclass gpu.nvidia.com -o jsonpath='{.spec.extendedResourceName}')\" == nvidia.com/gpu ]]" \
		_ "${kubectl[@]}" --kubeconfig "$kubeconfig"

	# The agent's code paths, as its ServiceAccount.
	slice='{"apiVersion":"resource.k8s.io/v1","kind":"ResourceSlice","metadata":{"name":"chart-check-node-gpu.nvidia.com"},"spec":{"driver":"gpu.nvidia.com","nodeName":"chart-check-node","pool":{"name":"chart-check-node","generation":1,"resourceSliceCount":1},"devices":[{"name":"gpu-0"}]}}'
	run "agent: server-side apply creates a ResourceSlice" \
		k apply --server-side --field-manager nvdra-agent "${as_agent[@]}" -f - <<<"$slice"
	run "agent: lists its slices by field selector" k get resourceslices "${as_agent[@]}" \
		--field-selector spec.driver=gpu.nvidia.com,spec.nodeName=chart-check-node
	run "agent: deletes a ResourceSlice" k delete resourceslice chart-check-node-gpu.nvidia.com "${as_agent[@]}"
	run "agent: lists ResourceClaims cluster-wide" k get resourceclaims --all-namespaces "${as_agent[@]}"
	run "agent: may get a Node" k auth can-i get nodes "${as_agent[@]}"
	run "agent: may create Events in default" k auth can-i create events.events.k8s.io -n default "${as_agent[@]}"
	run "agent: may watch ComputeDomains cluster-wide" \
		k auth can-i watch computedomains.resource.nvidia.com --all-namespaces "${as_agent[@]}"
	run "agent: may watch ComputeDomainCliques in the driver namespace" \
		k auth can-i watch computedomaincliques.resource.nvidia.com -n "$ns" "${as_agent[@]}"
	refused "agent: may not list Nodes" k get nodes "${as_agent[@]}"
	refused "agent: may not read Secrets" k get secrets -n "$ns" "${as_agent[@]}"
	for denied in "update resourceclaims" "update nodes" "get resourceslices" "create events.events.k8s.io -n $ns"; do
		# shellcheck disable=SC2086 # word splitting of $denied is intended
		# stdout only: can-i warns on stderr about cluster-scoped resources.
		if out="$(k auth can-i $denied "${as_agent[@]}" 2>/dev/null)"; then
			fail "agent: may not $denied" "$out"
		elif [[ "$out" == no ]]; then
			pass "agent: may not $denied"
		else
			fail "agent: may not $denied: auth can-i failed" "$out"
		fi
	done

	cleanup
	trap - EXIT
	if out="$(k get deviceclass -o name 2>&1)" && [[ -z "$out" ]]; then
		pass "cleanup removed the DeviceClasses"
	else
		fail "cleanup removed the DeviceClasses" "$out"
	fi
fi

if ((failures > 0)); then
	echo "$failures check(s) failed" >&2
	exit 1
fi
echo "all chart checks passed"
