#!/usr/bin/env bash
# Starts a real Kubernetes control plane (etcd, kube-apiserver, kube-scheduler,
# kube-controller-manager) on 127.0.0.1 for nvdra's e2e tests and waits until
# it is ready. Usage:
#
#   e2e/controlplane/up.sh RUN_DIR      # RUN_DIR must be absent or empty
#   e2e/controlplane/down.sh RUN_DIR
#
# RUN_DIR afterwards holds:
#   admin.kubeconfig, scheduler.kubeconfig, controller-manager.kubeconfig,
#   node-<name>.kubeconfig        (one per NVDRA_CP_NODES entry)
#   cluster.env                   shell-sourceable: ports, server URL, binary
#   pki/                          CA, serving/client certs, service-account keys
#   etcd/                         etcd data
#   logs/{all,etcd,apiserver,scheduler,controller-manager}.log
#   pids/{all,etcd,apiserver,scheduler,controller-manager}.pid (while running)
#
# There are no kubelets: Node objects, their status and pods' lifecycles are
# the caller's (or a kubelet emulator's) job.
#
# Environment:
#   NVDRA_CP_BIN             use this binary instead of running build.sh
#   NVDRA_CP_TIMEOUT         seconds to wait for readiness (default 180)
#   NVDRA_CP_NODES           space-separated node names to issue kubelet identities for
#   NVDRA_CP_FEATURE_GATES   extra gates appended to the defaults below (later wins)
#   NVDRA_CP_RUNTIME_CONFIG  extra --runtime-config entries
#   NVDRA_CP_CONTROLLERS     --controllers for the controller-manager
#   NVDRA_CP_V               log verbosity of the components (default 2)
#   NVDRA_CP_CLIENT_QPS      client QPS of the scheduler and of each
#                            controller-manager controller (burst twice that;
#                            default: upstream's 50/100 and 20/30)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -eq 1 ]] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
mkdir -p "$1"
run_dir="$(cd "$1" && pwd)"
if [[ -n "$(ls -A "$run_dir")" ]]; then
	# A reused directory would mix old etcd data with a new CA and keys.
	echo "up.sh: $run_dir is not empty; use a fresh directory (and down.sh the old one)" >&2
	exit 1
fi
command -v curl >/dev/null || { echo "up.sh: curl is required for readiness checks" >&2; exit 1; }

bin="${NVDRA_CP_BIN:-$("$here/build.sh")}"
timeout="${NVDRA_CP_TIMEOUT:-180}"
v="${NVDRA_CP_V:-2}"
started=$SECONDS

mkdir -p "$run_dir"/{logs,pids,etcd}
chmod 700 "$run_dir/etcd"
read -r -d '' etcd_port etcd_peer_port api_port sched_port cm_port < <("$bin" free-ports 5 && printf '\0') ||
	{ echo "up.sh: could not pick free ports" >&2; exit 1; }
server="https://127.0.0.1:$api_port"
pki="$run_dir/pki"

node_flags=()
for n in ${NVDRA_CP_NODES:-}; do node_flags+=(--node "$n"); done
# 10.0.0.1 is the first address of --service-cluster-ip-range below, which
# the API server gives to the kubernetes Service.
"$bin" certs --dir "$run_dir" --server "$server" --service-ip 10.0.0.1 "${node_flags[@]}"

# DRA feature gates, identical on every component so the API server, the
# scheduler's allocator and the controllers agree on which fields exist.
# In 1.37 all of these are on by default (several are GA and locked); they
# are listed so that the intended surface is explicit and a gate that is
# renamed or removed in a future pin fails loudly at start-up instead of
# silently dropping fields (see DroppedFieldsError in the kubelet-dra
# reference). Off-by-default alpha gates (DRAResourcePoolStatus,
# DRAPartitionableDevicesType, DRADeviceCompatibilityGroups, ...) can be
# added with NVDRA_CP_FEATURE_GATES.
gates="DynamicResourceAllocation=true"
gates+=",DRAAdminAccess=true"               # GA, locked: adminAccess requests
gates+=",DRAPrioritizedList=true"           # GA, locked: firstAvailable
gates+=",DRAResourceClaimDeviceStatus=true" # GA, locked: driver-written status.devices
gates+=",DRAExtendedResource=true"          # GA, locked: DeviceClass.extendedResourceName
gates+=",DRADeviceTaints=true"              # GA: taints in ResourceSlices, tolerations
gates+=",DRADeviceTaintRules=true"          # GA: DeviceTaintRule (resource.k8s.io/v1)
gates+=",DRAPartitionableDevices=true"      # beta: sharedCounters / consumesCounters
gates+=",DRAConsumableCapacity=true"        # beta: shared devices with capacity requests
gates+=",DRADeviceBindingConditions=true"   # beta: bindingConditions
gates+="${NVDRA_CP_FEATURE_GATES:+,$NVDRA_CP_FEATURE_GATES}"

# resource.k8s.io/v1 is GA and on by default. The beta versions are also
# served because the upstream driver and older clients fall back to them
# (resourceApiVersion auto: v1 > v1beta2 > v1beta1).
runtime_config="resource.k8s.io/v1beta1=true,resource.k8s.io/v1beta2=true"
runtime_config+="${NVDRA_CP_RUNTIME_CONFIG:+,$NVDRA_CP_RUNTIME_CONFIG}"

# The API server refuses to publish a loopback address as the endpoints of
# the "kubernetes" Service, so that reconciler is off
# (--endpoint-reconciler-type=none): nothing runs in pods here, and every
# client, including a kubelet emulator, uses a kubeconfig instead.
#
# The controller-manager, unlike the scheduler, exits at start if RBAC is not
# bootstrapped yet when it reads the request-header CA; it tolerates that
# here (--authentication-tolerate-lookup-failure), and the supervisor
# restarts components that exit anyway.
#
# node-lifecycle-controller is off: without kubelets posting Leases it would
# mark every Node NotReady after 40s and evict its pods after 5 minutes. The
# TaintNodesByCondition admission plugin is off for the same reason: it taints
# each new Node node.kubernetes.io/not-ready, which only that controller
# removes. Re-enable both once a kubelet emulator heartbeats.
controllers="${NVDRA_CP_CONTROLLERS:-*,-node-lifecycle-controller}"
client_qps=()
if [[ -n "${NVDRA_CP_CLIENT_QPS:-}" ]]; then
	client_qps=(--kube-api-qps="$NVDRA_CP_CLIENT_QPS" --kube-api-burst="$((2 * NVDRA_CP_CLIENT_QPS))")
fi

cat >"$run_dir/cluster.env" <<EOF
# Written by e2e/controlplane/up.sh; shell-sourceable.
NVDRA_CP_BIN='$bin'
NVDRA_CP_RUN_DIR='$run_dir'
NVDRA_CP_SERVER='$server'
NVDRA_CP_ETCD='http://127.0.0.1:$etcd_port'
NVDRA_CP_APISERVER_PORT=$api_port
NVDRA_CP_SCHEDULER_PORT=$sched_port
NVDRA_CP_CONTROLLER_MANAGER_PORT=$cm_port
KUBECONFIG='$run_dir/admin.kubeconfig'
EOF

# One supervisor in its own session owns all four components: down.sh
# signals it, it stops them in reverse order, and if it dies anyway its
# children get SIGTERM (Pdeathsig). setsid keeps a terminal's Ctrl-C or the
# caller's process group teardown from reaching the cluster half-way.
setsid "$bin" all --log-dir "$run_dir/logs" --pid-dir "$run_dir/pids" \
	-- etcd \
	--data-dir "$run_dir/etcd" \
	--listen-client-url "http://127.0.0.1:$etcd_port" \
	--listen-peer-url "http://127.0.0.1:$etcd_peer_port" \
	--unsafe-no-fsync \
	-- apiserver \
	--v="$v" \
	--etcd-servers="http://127.0.0.1:$etcd_port" \
	--bind-address=127.0.0.1 \
	--advertise-address=127.0.0.1 \
	--endpoint-reconciler-type=none \
	--secure-port="$api_port" \
	--cert-dir="$pki" \
	--tls-cert-file="$pki/apiserver.crt" \
	--tls-private-key-file="$pki/apiserver.key" \
	--client-ca-file="$pki/ca.crt" \
	--kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
	--kubelet-client-key="$pki/apiserver-kubelet-client.key" \
	--authorization-mode=Node,RBAC \
	--enable-admission-plugins=NodeRestriction \
	--disable-admission-plugins=TaintNodesByCondition \
	--allow-privileged=true \
	--service-cluster-ip-range=10.0.0.0/24 \
	--service-account-issuer=https://kubernetes.default.svc.cluster.local \
	--service-account-key-file="$pki/sa.pub" \
	--service-account-signing-key-file="$pki/sa.key" \
	--runtime-config="$runtime_config" \
	--feature-gates="$gates" \
	-- scheduler \
	--v="$v" \
	--kubeconfig="$run_dir/scheduler.kubeconfig" \
	--authentication-kubeconfig="$run_dir/scheduler.kubeconfig" \
	--authorization-kubeconfig="$run_dir/scheduler.kubeconfig" \
	--bind-address=127.0.0.1 \
	--secure-port="$sched_port" \
	--leader-elect=false \
	--feature-gates="$gates" \
	"${client_qps[@]}" \
	-- controller-manager \
	--v="$v" \
	--kubeconfig="$run_dir/controller-manager.kubeconfig" \
	--authentication-kubeconfig="$run_dir/controller-manager.kubeconfig" \
	--authorization-kubeconfig="$run_dir/controller-manager.kubeconfig" \
	--authentication-tolerate-lookup-failure=true \
	--bind-address=127.0.0.1 \
	--secure-port="$cm_port" \
	--leader-elect=false \
	--controllers="$controllers" \
	"${client_qps[@]}" \
	--use-service-account-credentials=true \
	--service-account-private-key-file="$pki/sa.key" \
	--root-ca-file="$pki/ca.crt" \
	--cluster-signing-cert-file="$pki/ca.crt" \
	--cluster-signing-key-file="$pki/ca.key" \
	--feature-gates="$gates" \
	>"$run_dir/logs/all.log" 2>&1 </dev/null &
launched=$!

fail() {
	echo "up.sh: $*" >&2
	for f in all etcd apiserver scheduler controller-manager; do
		[[ -f "$run_dir/logs/$f.log" ]] || continue
		echo "----- last 40 lines of $run_dir/logs/$f.log -----" >&2
		tail -n 40 "$run_dir/logs/$f.log" >&2
	done
	"$here/down.sh" "$run_dir" >&2 || true
	exit 1
}

# ok URL: true when the endpoint answers 200 "ok". The scheduler and
# controller-manager serve self-signed certificates, hence -k for those;
# /readyz and /healthz need no credentials.
ok() { [[ "$(curl -fsS --max-time 5 "${@:2}" "$1" 2>/dev/null)" == ok ]]; }

deadline=$((started + timeout))
sup=""
while :; do
	# all.pid is written by the supervisor itself (and removed when it
	# exits); until it appears the launched process must be alive (setsid
	# execs in place here, so it is the same process).
	[[ -z "$sup" && -f "$run_dir/pids/all.pid" ]] && sup="$(cat "$run_dir/pids/all.pid")"
	if [[ -n "$sup" ]]; then
		kill -0 "$sup" 2>/dev/null || fail "the supervisor exited"
	elif ! kill -0 "$launched" 2>/dev/null; then
		sleep 0.2
		[[ -f "$run_dir/pids/all.pid" ]] || fail "the supervisor exited before writing its PID file"
	fi
	if ok "$server/readyz" --cacert "$pki/ca.crt" &&
		ok "https://127.0.0.1:$sched_port/readyz" -k &&
		ok "https://127.0.0.1:$cm_port/healthz" -k; then
		break
	fi
	((SECONDS < deadline)) || fail "control plane not ready within ${timeout}s"
	sleep 0.5
done
echo "up.sh: control plane ready in $((SECONDS - started))s at $server (KUBECONFIG=$run_dir/admin.kubeconfig)" >&2
