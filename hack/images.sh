#!/usr/bin/env bash
# The node plugin's and the controller's container images, built here with
# the project's own tooling (fast-sandbox-dev packs OCI image layouts; no
# Docker, no registry): release binaries, each with the shared libraries it
# links, as one reproducible layer.
#
# usage: hack/images.sh [OUT_DIR]        (default: <target dir>/images)
#
# Writes OUT_DIR/node.tar and OUT_DIR/controller.tar (OCI archives, for
# `ctr images import`, `skopeo copy oci-archive:…` or a registry push) and
# prints the two image names. Tags: the workspace version and the git
# revision, e.g. 0.1.0-g54d8da9c1e2f (`-modified` for an unclean tree), the
# same revision `--version` prints.
#
# Settings (environment):
#   FAST_SANDBOX_IMAGE_REPO  repository prefix, default localhost/fast-sandbox
set -Eeuo pipefail

FSB_LOG_NAME=images
# shellcheck source=hack/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FSB_REPO"

REPO=${FAST_SANDBOX_IMAGE_REPO:-localhost/fast-sandbox}
target_dir=$(fsb_cargo_target_dir)
OUT=$(realpath -m -- "${1:-$target_dir/images}")

version=$(cargo metadata --no-deps --format-version 1 --locked |
	sed -n 's/.*"name":"fast-sandbox-node","version":"\([^"]*\)".*/\1/p')
[[ -n $version ]] || fsb_die "cannot read the workspace version from cargo metadata"
revision=$(git rev-parse --short=12 HEAD 2>/dev/null) || revision=unknown
if [[ $revision != unknown ]] && ! git diff --quiet HEAD 2>/dev/null; then
	revision+=-modified
fi
TAG=$version-g$revision

fsb_log "building release binaries"
cargo build --release --locked -p fast-sandbox-node -p fast-sandbox-controller -p fast-sandbox-devtool
devtool=$target_dir/release/fast-sandbox-dev

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

# image NAME BINARY: BINARY as /usr/local/bin/BINARY, with the libraries
# ldd names at their own paths (glibc's loader included).
image() {
	local name=$1 binary=$2 root=$work/$1 lib
	mkdir -p "$root/usr/local/bin" "$root/tmp"
	install -m 0755 "$target_dir/release/$binary" "$root/usr/local/bin/$binary"
	for lib in $(ldd "$target_dir/release/$binary" | grep -o '/[^ ]*'); do
		mkdir -p "$root$(dirname "$lib")"
		cp -L "$lib" "$root$lib"
	done
	"$devtool" image rootfs --dir "$root" --entrypoint "/usr/local/bin/$binary" \
		--name "$REPO/$name:$TAG" --out "$OUT/$name.tar" >&2
	printf '%s/%s:%s\n' "$REPO" "$name" "$TAG"
}

image node fast-sandbox-node
image controller fast-sandbox-controller
fsb_log "images in $OUT (tag $TAG); deploy them with: cd deploy && kustomize edit set image fast-sandbox/node=$REPO/node:$TAG fast-sandbox/controller=$REPO/controller:$TAG"
