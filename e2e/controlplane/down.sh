#!/usr/bin/env bash
# Stops a control plane started by up.sh and verifies that none of its
# processes are left. Usage:
#
#   e2e/controlplane/down.sh RUN_DIR
#
# The run directory (logs, etcd data, certificates) is kept for inspection.
# Only processes running this cluster's nvdra-controlplane binary are ever
# signalled, so a stale PID file whose number was reused cannot hit an
# unrelated process.
#
# Environment:
#   NVDRA_CP_STOP_TIMEOUT   seconds to wait for a graceful stop (default 90)
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
run_dir="$(cd "$1" 2>/dev/null && pwd)" || { echo "down.sh: $1 does not exist; nothing to stop" >&2; exit 0; }
pids_dir="$run_dir/pids"
[[ -d "$pids_dir" && -f "$run_dir/cluster.env" ]] || { echo "down.sh: $run_dir was not set up by up.sh; nothing to stop" >&2; exit 0; }
bin="$(sed -n "s/^NVDRA_CP_BIN='\(.*\)'\$/\1/p" "$run_dir/cluster.env")"
[[ -n "$bin" ]] || { echo "down.sh: no NVDRA_CP_BIN in $run_dir/cluster.env" >&2; exit 1; }
timeout="${NVDRA_CP_STOP_TIMEOUT:-90}"

# ours PID: the process exists and runs this cluster's binary. A rebuilt
# binary shows up as "PATH (deleted)" for processes started before.
ours() {
	local exe
	exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
	[[ "$exe" == "$bin" || "$exe" == "$bin (deleted)" ]]
}

# pid_files: the PIDs recorded in the PID files (the supervisor deletes a
# child's file once it has exited, and its own when it exits).
pid_files() {
	local f pid
	for f in "$pids_dir"/*.pid; do
		[[ -f "$f" ]] || continue
		pid="$(cat "$f" 2>/dev/null)" || continue
		[[ "$pid" =~ ^[0-9]+$ ]] && echo "$pid"
	done
}

# The sessions the recorded processes run in, taken once before anything is
# stopped: up.sh starts the supervisor with setsid, so every component is in
# its session, and a component whose PID file was lost is still found.
declare -A sessions=()
for pid in $(pid_files); do
	sid="$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')" || true
	[[ -n "$sid" ]] && ours "$sid" && sessions[$sid]=1
done

# members: our processes among the PID files and the recorded sessions.
members() {
	local pid
	local -A seen=()
	for pid in $(pid_files); do seen[$pid]=1; done
	for sid in "${!sessions[@]}"; do
		for pid in $(ps -o pid= -s "$sid" 2>/dev/null); do seen[$pid]=1; done
	done
	for pid in "${!seen[@]}"; do
		if ours "$pid"; then echo "$pid"; fi
	done
}

alive() { [[ -n "$(members)" ]]; }

started=$SECONDS
sup=""
[[ -f "$pids_dir/all.pid" ]] && sup="$(cat "$pids_dir/all.pid")"
if [[ -n "$sup" ]] && ours "$sup"; then
	# The supervisor stops the components in reverse start order.
	kill -TERM "$sup" 2>/dev/null || true
else
	# No supervisor: stop whatever is left directly.
	for pid in $(members); do kill -TERM "$pid" 2>/dev/null || true; done
fi
while alive && ((SECONDS - started < timeout)); do sleep 0.2; done

if alive; then
	echo "down.sh: still running after ${timeout}s, killing: $(members | tr '\n' ' ')" >&2
	for pid in $(members); do kill -KILL "$pid" 2>/dev/null || true; done
	sleep 1
fi
if alive; then
	echo "down.sh: processes left: $(members | tr '\n' ' ')" >&2
	exit 1
fi
rm -f "$pids_dir"/*.pid
echo "down.sh: stopped in $((SECONDS - started))s; no processes left" >&2
