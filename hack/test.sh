#!/usr/bin/env bash
# Every test tier, on a fresh machine: installs what is missing, brings up
# the development node (private containerd, CNI bridge, local images, a
# registry on 127.0.0.1), runs format and lint checks, the unit tests, the
# integration tests against the real containerd, a short run of each
# benchmark so it stays working, and stops everything it started.
#
# usage: hack/test.sh [cargo test args...]
#   as root, or as a user with sudo (the script re-runs itself under sudo,
#   keeping PATH and the Rust toolchain).
#
# Under CI=true no test may skip: a test that cannot reach the development
# node fails instead.
set -Eeuo pipefail

FSB_LOG_NAME=test
# shellcheck source=hack/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
fsb_become_root "$@"
cd "$FSB_REPO"

# Disk: a CI machine's free space is not fixed (one run failed with ENOSPC
# in its last build). Under CI no build is incremental, and each build is
# removed once nothing later needs it; the free space is logged at each
# stage so a shortfall shows where it came from.
if [[ ${CI:-} == true ]]; then
	export CARGO_INCREMENTAL=0
fi
disk() {
	local dir
	dir=$(fsb_cargo_target_dir)
	mkdir -p "$dir"
	fsb_log "disk: $(df -h --output=avail "$dir" | tail -n 1 | tr -d ' ') free; target dir $(du -sh "$dir" 2>/dev/null | cut -f1) ($1)"
}
# ci_free DIR WHY: under CI only, remove a build nothing later needs.
ci_free() {
	[[ ${CI:-} == true && -e $1 ]] || return 0
	fsb_log "freeing $(du -sh "$1" | cut -f1) ($2): $1"
	rm -rf -- "$1"
}

started=0
cleanup() {
	local rc=$?
	if ((started)) && [[ ${FAST_SANDBOX_KEEP_NODE:-} != 1 ]]; then
		fsb_log "stopping the development node"
		"$FSB_REPO/hack/dev-node.sh" down || rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT

# protoc: build scripts (k8s-cri, proto/) run it, and clippy below is the
# first build on a fresh machine, before dev-node.sh installs the rest;
# curl is a real HTTP/2 client for the shim's :authority test.
fsb_ensure_packages protobuf-compiler curl

fsb_log "checking format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
disk "after clippy"

started=1
# With a second upstream: containerd 2.1 (Debian unstable's package,
# unpacked, never installed) beside the system's containerd 1.6.
FAST_SANDBOX_CONTAINERD2=1 "$FSB_REPO/hack/dev-node.sh" up
# shellcheck disable=SC1090
. "${FAST_SANDBOX_DEV_DIR:-/var/lib/fast-sandbox-dev}/env"
# Go (Debian, offline) and Python (PyPI grpcio) CRI clients: real_clients.rs.
"$FSB_REPO/hack/clients.sh"
# shellcheck disable=SC1091
. "$FAST_SANDBOX_DEV_DIR/clients/env"

# The upgrade test (node-plugin/tests/restart_root.rs) starts the previous
# release's node plugin, then this one, on the same state. The previous
# release is the revision in hack/previous-release (the last main that
# landed), built from this clone's history into a target dir of its own.
previous=$(<"$FSB_REPO/hack/previous-release")
previous_target=$(fsb_cargo_target_dir)/previous-release
if git -C "$FSB_REPO" cat-file -e "$previous^{commit}" 2>/dev/null; then
	fsb_log "building the previous release's node plugin (${previous:0:12}) for the upgrade test"
	rm -rf "$previous_target/src"
	mkdir -p "$previous_target"
	git -C "$FSB_REPO" archive --format=tar --prefix=src/ "$previous" | tar -x -C "$previous_target"
	(cd "$previous_target/src" && CARGO_TARGET_DIR=$previous_target/target \
		cargo build --locked -p fast-sandbox-node)
	export FAST_SANDBOX_PREVIOUS_NODE_BINARY=$previous_target/target/debug/fast-sandbox-node
else
	# A shallow clone: the upgrade test then restarts this release's binary
	# on its own state (what the restart test also covers), and says so.
	fsb_log "warning: ${previous:0:12} (hack/previous-release) is not in this clone: the upgrade test runs this release's binary twice"
	export FAST_SANDBOX_PREVIOUS_NODE_BINARY=$(fsb_cargo_target_dir)/debug/fast-sandbox-node
fi

fsb_log "running the tests (unit, in-process, and against containerd)"
cargo test --workspace --locked "$@"

# The same harness against containerd 2.1 (FAST_SANDBOX_UPSTREAM picks the
# env file's FAST_SANDBOX_CONTAINERD2_* instance). The subset, chosen for
# time: warm = cold for runc (also with the network rebound), warm pod
# stats and cgroup moves, the CRI lifecycle for runc, the gVisor tests
# (cold, warm = cold and gVisor's own network stack), and the shim's Status
# and handler features against containerd 2.1's real handler list. Left
# out: crun (Debian 12's crun 1.8.1 refuses containerd 2.1's OCI spec
# version, see section 13 of docs/containerd-1.6-sandbox-state.md) and the
# containerd-restart test.
fsb_log "running the containerd $FAST_SANDBOX_CONTAINERD2_VERSION subset"
c2_start=$SECONDS
FAST_SANDBOX_UPSTREAM=containerd2 cargo test --locked -p fast-sandbox-tests \
	--test warm --test cri_lifecycle --test real_status --test gvisor \
	--test gvisor_netstack --test warm_gvisor \
	-- --skip crun --skip containerd_restart
fsb_log "containerd $FAST_SANDBOX_CONTAINERD2_VERSION subset took $((SECONDS - c2_start)) s"
disk "after the tests"
# Every later stage builds in release (or in fuzz/target).
ci_free "$previous_target" "the previous release's build, used only by the upgrade test"
ci_free "$(fsb_cargo_target_dir)/debug" "the test build; later stages build in release"

# --- supply chain and fuzzing (docs/reliability.md) ---------------------
fsb_log "cargo deny: licences, duplicate versions, sources, advisories"
# Advisories from the live RustSec database, or where GitHub is unreachable
# from the snapshot in ../shared (hack/deny.sh): never skipped.
"$FSB_REPO/hack/deny.sh"
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
"$FSB_REPO/hack/fuzz.sh" 60
disk "after fuzzing"
# The fuzz build; the corpus it grew (fuzz/target/work) stays.
for dir in "$FSB_REPO"/fuzz/target/*; do
	[[ $dir == */work ]] || ci_free "$dir" "the fuzz build"
done
# --- end of supply chain and fuzzing -------------------------------------

fsb_log "short benchmark runs (figures are not asserted here; see README)"
cargo build --release --locked -p fast-sandbox-bench -p fast-sandbox-node
target_dir=$(fsb_cargo_target_dir)
"$target_dir/release/fast-sandbox-bench" proxy --calls 200 --pods 3
"$target_dir/release/fast-sandbox-bench" warm --pods 3 --concurrent 4 --idle-slots 4
"$target_dir/release/fast-sandbox-bench" load --pods 20 --duration 10

# The images (hack/images.sh): built with the project's own tooling, then
# run for real on the development node's containerd: the node image's
# binary must answer --version with this tree's revision.
disk "after the benchmarks"
fsb_log "building the node and controller images"
"$FSB_REPO/hack/images.sh" "$target_dir/images" >"$target_dir/images.txt"
node_image=$(grep '/node:' "$target_dir/images.txt")
ctr_address=${FAST_SANDBOX_CONTAINERD_ENDPOINT#unix://}
ctr -a "$ctr_address" -n fast-sandbox-images images import "$target_dir/images/node.tar" >/dev/null
reported=$(timeout 60 ctr -a "$ctr_address" -n fast-sandbox-images run --rm "$node_image" \
	images-version fast-sandbox-node --version)
ctr -a "$ctr_address" -n fast-sandbox-images images rm "$node_image" >/dev/null
[[ $reported == *"git $(git -C "$FSB_REPO" rev-parse --short=12 HEAD)"* ]] ||
	fsb_die "the node image reports '$reported', not this tree's revision"
fsb_log "node image runs: $reported"
disk "at the end"
