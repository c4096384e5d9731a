#!/usr/bin/env bash
# Proves that a control plane started by up.sh is usable for DRA: the API is
# ready, resource.k8s.io/v1 is served, and the real kube-scheduler allocates
# devices from a ResourceSlice, honouring a DeviceTaintRule, both for a claim
# from a ResourceClaimTemplate (created by the controller-manager's
# resourceclaim controller) and for a DRA-backed extended resource. Usage:
#
#   e2e/controlplane/smoke.sh RUN_DIR
#
# Safe to rerun against the same cluster: every object carries a per-run
# suffix and is deleted at the end (NVDRA_SMOKE_KEEP=1 keeps them).
#
# Environment:
#   KUBECTL           kubectl command (default: the control plane's own,
#                     "nvdra-controlplane kubectl", which has no version skew)
#   NVDRA_SMOKE_KEEP  1 to leave the test objects in place
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
run_dir="$(cd "$1" && pwd)"
# shellcheck source=/dev/null
source "$run_dir/cluster.env"
read -r -a kubectl_cmd <<<"${KUBECTL:-$NVDRA_CP_BIN kubectl}"
k() { "${kubectl_cmd[@]}" --kubeconfig "$run_dir/admin.kubeconfig" "$@"; }
started=$SECONDS

fail() {
	echo "smoke.sh: FAIL: $*" >&2
	exit 1
}
step() { echo "smoke.sh: $*" >&2; }

# wait_for SECONDS COMMAND...: retry COMMAND until it succeeds or SECONDS pass.
wait_for() {
	local deadline=$((SECONDS + $1))
	shift
	until "$@"; do
		((SECONDS < deadline)) || return 1
		sleep 0.5
	done
}

step "client: $(k version --client -o json | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p' | head -1), server: $(k version -o json | sed -n '/serverVersion/,$ s/.*"gitVersion": "\(.*\)".*/\1/p' | head -1)"

[[ "$(k get --raw /readyz)" == ok ]] || fail "/readyz is not ok"
step "/readyz ok"

resources="$(k api-resources --api-group=resource.k8s.io -o name)"
for r in deviceclasses resourceclaims resourceclaimtemplates resourceslices devicetaintrules; do
	grep -qx "$r.resource.k8s.io" <<<"$resources" || fail "resource.k8s.io serves no $r; got: $resources"
done
versions="$(k api-versions | grep '^resource.k8s.io/' | tr '\n' ' ')"
[[ " $versions" == *" resource.k8s.io/v1 "* ]] || fail "resource.k8s.io/v1 not served; got: $versions"
step "resource.k8s.io serves $(tr '\n' ' ' <<<"$resources")($versions)"

suffix="$(date +%s)-$$"
ns="nvdra-smoke-$suffix"
node="nvdra-smoke-$suffix"
driver="smoke.nvdra.example.com"
class="smoke-$suffix"
xres="smoke.nvdra.example.com/gpu-$$"

cleanup() {
	[[ "${NVDRA_SMOKE_KEEP:-0}" == 1 ]] && return
	# Without a kubelet nothing confirms a bound pod's termination, so the
	# pods are force-deleted; the namespace then goes away by itself.
	k delete pods -n "$ns" --all --grace-period=0 --force >/dev/null 2>&1 || true
	k delete namespace "$ns" --wait=false --ignore-not-found >/dev/null || true
	k delete "devicetaintrule/$class" "deviceclass/$class" "resourceslice/$node" "node/$node" \
		--ignore-not-found >/dev/null || true
}
trap cleanup EXIT

now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# A Node without a kubelet: its status (allocatable, Ready) is written
# through the status subresource as a kubelet would, because the
# scheduler's NodeResourcesFit needs a pod capacity.
k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: $ns}
---
apiVersion: v1
kind: Node
metadata:
  name: $node
  labels: {kubernetes.io/hostname: $node, nvdra.example.com/smoke: "true"}
EOF
k patch node "$node" --subresource=status --type=merge -p "$(
	cat <<EOF
{"status": {
  "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
  "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "smoke.sh", "lastHeartbeatTime": "$now", "lastTransitionTime": "$now"}]
}}
EOF
)" >/dev/null
step "created namespace $ns and node $node"

# Three devices; gpu-0 is tainted NoSchedule by a DeviceTaintRule, so the two
# pods must get gpu-1 and gpu-2. The class also backs the extended resource
# $xres.
k apply -f - >/dev/null <<EOF
apiVersion: resource.k8s.io/v1
kind: DeviceTaintRule
metadata: {name: $class}
spec:
  deviceSelector: {driver: $driver, pool: $node, device: gpu-0}
  taint: {key: smoke.nvdra.example.com/broken, value: "true", effect: NoSchedule}
---
apiVersion: resource.k8s.io/v1
kind: DeviceClass
metadata: {name: $class}
spec:
  selectors:
  - cel: {expression: 'device.driver == "$driver"'}
  extendedResourceName: $xres
---
apiVersion: resource.k8s.io/v1
kind: ResourceSlice
metadata: {name: $node}
spec:
  driver: $driver
  nodeName: $node
  pool: {name: $node, generation: 1, resourceSliceCount: 1}
  devices:
  - name: gpu-0
    attributes: {index: {int: 0}, model: {string: smoke}}
    capacity: {memory: {value: 80Gi}}
  - name: gpu-1
    attributes: {index: {int: 1}, model: {string: smoke}}
    capacity: {memory: {value: 80Gi}}
  - name: gpu-2
    attributes: {index: {int: 2}, model: {string: smoke}}
    capacity: {memory: {value: 80Gi}}
EOF
step "created DeviceTaintRule, DeviceClass and ResourceSlice (3 devices) for driver $driver"

k apply -n "$ns" -f - >/dev/null <<EOF
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: gpu}
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly: {deviceClassName: $class}
---
apiVersion: v1
kind: Pod
metadata: {name: with-claim}
spec:
  nodeSelector: {nvdra.example.com/smoke: "true"}
  resourceClaims:
  - {name: gpu, resourceClaimTemplateName: gpu}
  containers:
  - name: c
    image: registry.k8s.io/pause:3.10
    resources:
      claims: [{name: gpu}]
---
apiVersion: v1
kind: Pod
metadata: {name: with-extended-resource}
spec:
  nodeSelector: {nvdra.example.com/smoke: "true"}
  containers:
  - name: c
    image: registry.k8s.io/pause:3.10
    resources:
      limits: {$xres: "1"}
EOF
step "created pods with-claim (ResourceClaimTemplate) and with-extended-resource ($xres: 1)"

bound() { [[ "$(k get pod -n "$ns" "$1" -o jsonpath='{.spec.nodeName}')" == "$node" ]]; }
for pod in with-claim with-extended-resource; do
	if ! wait_for 60 bound "$pod"; then
		k describe pod -n "$ns" "$pod" >&2 || true
		fail "pod $pod was not scheduled to $node within 60s"
	fi
done
step "scheduler bound both pods to $node"

# claim_device POD CLAIM: print the device CLAIM got, after checking that it
# is exactly one device of our driver and pool and that CLAIM is reserved
# for POD.
claim_device() {
	local pod="$1" claim="$2" got uid reserved
	got="$(k get resourceclaim -n "$ns" "$claim" -o jsonpath='{.status.allocation.devices.results[*].driver}/{.status.allocation.devices.results[*].pool}/{.status.allocation.devices.results[*].device}')"
	[[ "$got" == "$driver/$node/"* && "$got" != *" "* ]] || fail "claim $claim of $pod: allocation is '$got', want one device of $driver/$node"
	uid="$(k get pod -n "$ns" "$pod" -o jsonpath='{.metadata.uid}')"
	reserved="$(k get resourceclaim -n "$ns" "$claim" -o jsonpath='{.status.reservedFor[*].uid}')"
	[[ " $reserved " == *" $uid "* ]] || fail "claim $claim is not reserved for pod $pod ($uid); reservedFor: '$reserved'"
	step "claim $claim: allocated $got, reserved for $pod"
	echo "${got##*/}"
}

claim="$(k get pod -n "$ns" with-claim -o jsonpath='{.status.resourceClaimStatuses[?(@.name=="gpu")].resourceClaimName}')"
[[ -n "$claim" ]] || fail "pod with-claim has no generated ResourceClaim in status.resourceClaimStatuses"
dev1="$(claim_device with-claim "$claim")"

xclaim="$(k get pod -n "$ns" with-extended-resource -o jsonpath='{.status.extendedResourceClaimStatus.resourceClaimName}')"
[[ -n "$xclaim" ]] || fail "pod with-extended-resource has no status.extendedResourceClaimStatus"
dev2="$(claim_device with-extended-resource "$xclaim")"

# The pods race, so either may get either untainted device; gpu-0 is
# tainted and must be left alone.
[[ "$(printf '%s\n' "$dev1" "$dev2" | sort | tr '\n' ' ')" == "gpu-1 gpu-2 " ]] ||
	fail "devices allocated are '$dev1' and '$dev2', want gpu-1 and gpu-2 (gpu-0 is tainted NoSchedule)"
step "tainted gpu-0 was skipped"

echo "smoke.sh: PASS in $((SECONDS - started))s" >&2
