#!/usr/bin/env bash
# The quickstart: a development node (private containerd with runc and crun,
# a CNI bridge, locally built images), fast-sandbox-node serving CRI in front
# of it with warm pools for fast-runc and fast-crun, and the same demo pod
# started N times cold and N times warm, printed as a table (RunPodSandbox
# and pod start to container running, p50/p99, warm/cold ratio), then the
# proxy overhead for calls that are only forwarded. Beside the table it prints
# the warm hits and the misses by reason the node plugin counted (its /metrics).
#
# usage: hack/quickstart.sh [--keep]
#   as root, or as a user with sudo (the script re-runs itself under sudo)
#   FAST_SANDBOX_DEMO_PODS   pods per side and handler (default 30)
#   --keep   leave the development node running afterwards
#            (stop it with `hack/dev-node.sh down`)
set -Eeuo pipefail

FSB_LOG_NAME=quickstart
# shellcheck source=hack/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
fsb_become_root "$@"
cd "$FSB_REPO"

keep=0
[[ ${1:-} == --keep ]] && keep=1
cleanup() {
	local rc=$?
	if ((!keep)); then
		fsb_log "stopping the development node (pass --keep to leave it up)"
		"$FSB_REPO/hack/dev-node.sh" down || rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT

FAST_SANDBOX_SKIP_SMOKE=1 "$FSB_REPO/hack/dev-node.sh" up
# shellcheck disable=SC1090
. "${FAST_SANDBOX_DEV_DIR:-/var/lib/fast-sandbox-dev}/env"

fsb_log "building fast-sandbox-node and the benchmarks (release)"
cargo build --release --locked -p fast-sandbox-node -p fast-sandbox-bench
target_dir=$(fsb_cargo_target_dir)

pods=${FAST_SANDBOX_DEMO_PODS:-30}
fsb_log "warm vs cold: $pods pods each way on runc and crun, through fast-sandbox-node"
"$target_dir/release/fast-sandbox-bench" warm --handlers runc,crun --pods "$pods" --concurrent 20 --idle-slots 0

fsb_log "forwarded calls: straight to containerd vs through fast-sandbox-node"
"$target_dir/release/fast-sandbox-bench" proxy --handler runc --calls 1000 --pods 20
