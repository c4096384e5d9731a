#!/usr/bin/env bash
# Builds helm from its Go module (through the Go module proxy; no download
# site is reachable here) into the e2e cache and prints the binary's path on
# stdout; progress goes to stderr. Usage:
#
#   helm="$(e2e/helm/build.sh)"
#
# The e2e suite and the local cluster render charts/nvdra with it, exactly as
# a user's `helm install` would. The build is skipped when the binary was
# built from the same helm version and Go toolchain.
#
# Environment: NVDRA_E2E_CACHE, GOMAXPROCS, GOCACHE as for
# e2e/controlplane/build.sh; NVDRA_HELM_FORCE=1 rebuilds.
set -euo pipefail

# Helm 3: the chart is apiVersion v2 and users install it with Helm >= 3.8.
helm_version=v3.19.0
# The Kubernetes minor helm's own k8s.io modules are at (v0.34 for 3.19):
# helm's release Makefile stamps it as the default .Capabilities.KubeVersion;
# unstamped, helm assumes v1.20 and our kubeVersion: >=1.34 check fails.
helm_k8s_minor=34

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cache="${NVDRA_E2E_CACHE:-$here/../.cache}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd -P)"
bin_dir="$cache/bin"
bin="$bin_dir/helm"
stamp="$bin.inputs"
export GOCACHE="${GOCACHE:-$cache/go-build}"
command -v go >/dev/null || { echo "helm/build.sh: go is not on PATH" >&2; exit 1; }

inputs="$helm_version k8s-1.$helm_k8s_minor $(go env GOVERSION)"
if [[ "${NVDRA_HELM_FORCE:-0}" != 1 && -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
	echo "helm/build.sh: $bin is up to date" >&2
	echo "$bin"
	exit 0
fi

mkdir -p "$bin_dir"
echo "helm/build.sh: building helm $helm_version" >&2
start=$SECONDS
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# go install in module mode builds helm with its own go.mod, so its
# Kubernetes libraries never meet the control plane's pins.
GOBIN="$tmp" GOMAXPROCS="${GOMAXPROCS:-2}" nice -n 19 \
	go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version \
		-X helm.sh/helm/v3/internal/version.gitTreeState=clean \
		-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$helm_k8s_minor \
		-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$helm_k8s_minor" \
	"helm.sh/helm/v3/cmd/helm@$helm_version"
mv -f "$tmp/helm" "$bin"
echo "$inputs" >"$stamp"
echo "helm/build.sh: built $bin in $((SECONDS - start))s" >&2
echo "$bin"
