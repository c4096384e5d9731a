#!/usr/bin/env bash
# Builds nvdra-controlplane (real upstream etcd, kube-apiserver, kube-scheduler,
# kube-controller-manager and kubectl in one binary) into the e2e cache and
# prints the binary's path on stdout; progress goes to stderr. Usage:
#
#   bin="$(e2e/controlplane/build.sh)"
#
# The build is skipped when the binary was built from the same go.mod, go.sum,
# *.go files and Go toolchain (recorded as a hash next to the binary); a cold
# build compiles most of Kubernetes and takes many minutes on two cores.
#
# Environment:
#   NVDRA_E2E_CACHE   cache root (default: <repo>/e2e/.cache, git-ignored)
#   GOMAXPROCS        compile parallelism (default 2: the machine is shared)
#   GOCACHE           Go build cache (default: <cache>/go-build)
#   GOMODCACHE, GOPROXY, GOFLAGS   honoured as usual by go
#   NVDRA_CP_FORCE=1  rebuild even when up to date
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cache="${NVDRA_E2E_CACHE:-$here/../.cache}"
# Canonical, because down.sh recognises our processes by /proc/PID/exe.
mkdir -p "$cache"
cache="$(cd "$cache" && pwd -P)"
bin_dir="$cache/bin"
bin="$bin_dir/nvdra-controlplane"
stamp="$bin.inputs-sha256"

cd "$here"
# A private build cache by default: it holds most of Kubernetes compiled
# (~3 GiB) and goes away with the rest of the e2e cache. An explicit GOCACHE
# wins.
export GOCACHE="${GOCACHE:-$cache/go-build}"
command -v go >/dev/null || { echo "build.sh: go is not on PATH" >&2; exit 1; }

# The toolchain is part of the key: a Go upgrade changes the binary.
inputs_hash="$( { go env GOVERSION; sha256sum go.mod go.sum ./*.go; } | sha256sum | cut -d' ' -f1)"
if [[ "${NVDRA_CP_FORCE:-0}" != 1 && -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$inputs_hash" ]]; then
	echo "build.sh: $bin is up to date" >&2
	echo "$bin"
	exit 0
fi

# Upstream release builds stamp the version into component-base and
# client-go with -X; without it /version reports v0.0.0-master and kubectl
# warns about skew. The version is read from go.mod so there is one pin.
k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ { print $2; exit }' go.mod)"
[[ "$k8s_version" =~ ^v1\.([0-9]+)\. ]] || { echo "build.sh: cannot find the k8s.io/kubernetes version in go.mod" >&2; exit 1; }
minor="${BASH_REMATCH[1]}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

mkdir -p "$bin_dir"
echo "build.sh: building nvdra-controlplane (Kubernetes $k8s_version); a cold build takes a long time" >&2
start=$SECONDS
# nice + low GOMAXPROCS: other builds and latency benchmarks share the machine.
GOMAXPROCS="${GOMAXPROCS:-2}" nice -n 19 \
	go build -trimpath -ldflags "$ldflags" -o "$bin.tmp" .
mv -f "$bin.tmp" "$bin"
echo "$inputs_hash" >"$stamp"
echo "build.sh: built $bin in $((SECONDS - start))s" >&2
echo "$bin"
