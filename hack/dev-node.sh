#!/usr/bin/env bash
# A development node: containerd 1.6 with runc, crun and runsc (gVisor, through
# the fast-sandbox-runsc adapter; runsc 2024-07-29 from Debian
# bookworm-backports, unpacked, not installed), a CNI bridge, the
# locally built pause and busybox images, and an image registry on
# 127.0.0.1 — all private to $FAST_SANDBOX_DEV_DIR, nothing pulled from any
# public registry.
#
# usage: dev-node.sh up | down | env
#
#   up    install the Debian packages (only the missing ones), build
#         fast-sandbox-dev, fast-sandbox-runsc and the pause binary, build the
#         images, start the registry and push the busybox image into it, start
#         the containerd instance, write $DEV_DIR/env, and smoke-test a pod
#         with runc, crun and runsc.
#         Idempotent: running it on a node that is up keeps what runs.
#   down  stop the instance (pods, shims, mounts, netns, bridge, iptables
#         rules) and the registry, and delete $DEV_DIR.
#   env   print $DEV_DIR/env, shell exports for tests and tools:
#         `eval "$(hack/dev-node.sh env)"` or `. /var/lib/fast-sandbox-dev/env`.
#
# Settings (environment):
#   FAST_SANDBOX_DEV_DIR      default /var/lib/fast-sandbox-dev
#   FAST_SANDBOX_BRIDGE       default fsb0
#   FAST_SANDBOX_CNI_SUBNET   default 10.209.0.0/16
#   FAST_SANDBOX_REGISTRY_PORT  first port to try for the registry, default 5000
#   FAST_SANDBOX_SKIP_SMOKE=1 skip the smoke pods at the end of `up`
#   FAST_SANDBOX_CONTAINERD2=1  also start a second instance, containerd 2.x
#         from Debian unstable's package: downloaded with apt-get into
#         $DEV_DIR/cache (never installed: the system keeps its glibc and
#         containerd 1.6), unpacked with dpkg -x into $DEV_DIR/containerd2-pkg,
#         run at $DEV_DIR/containerd2 with its own socket, state, root, config
#         (containerd 2's format, version 3) and CNI bridge; its endpoint goes
#         into the env file as FAST_SANDBOX_CONTAINERD2_ENDPOINT (and _ROOT,
#         _STATE, _LOG, _VERSION). Tests run against it with
#         FAST_SANDBOX_UPSTREAM=containerd2. `down` stops it too.
#   FAST_SANDBOX_CONTAINERD2_VERSION  an exact Debian version to download
#         (default: unstable's current containerd; a cached .deb is reused)
#   FAST_SANDBOX_RUNSC_VERSION  an exact Debian version of runsc to download from
#         bookworm-backports (default: its current one; a cached .deb is
#         reused). Unpacked into $DEV_DIR/runsc-pkg; $DEV_DIR/bin/runsc (beside
#         the adapter, which runs the runsc next to it) links to it, and the
#         env file exports it as FAST_SANDBOX_RUNSC.
#   FAST_SANDBOX_BRIDGE2      default fsb2 (the containerd 2 instance's bridge)
#   FAST_SANDBOX_CNI_SUBNET2  default 10.219.0.0/16
set -Eeuo pipefail

FSB_LOG_NAME=dev-node
# shellcheck source=hack/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEV_DIR=$(realpath -m -- "${FAST_SANDBOX_DEV_DIR:-/var/lib/fast-sandbox-dev}")
BRIDGE=${FAST_SANDBOX_BRIDGE:-fsb0}
SUBNET=${FAST_SANDBOX_CNI_SUBNET:-10.209.0.0/16}
FIRST_PORT=${FAST_SANDBOX_REGISTRY_PORT:-5000}
BRIDGE2=${FAST_SANDBOX_BRIDGE2:-fsb2}
SUBNET2=${FAST_SANDBOX_CNI_SUBNET2:-10.219.0.0/16}

INSTANCE_SCRIPT=$FSB_REPO/hack/containerd-instance.sh
INSTANCE_DIR=$DEV_DIR/containerd
INSTANCE2_DIR=$DEV_DIR/containerd2
# containerd 2.x: the downloaded .deb (cache) and its unpacked files.
CACHE_DIR=$DEV_DIR/cache
PKG2_DIR=$DEV_DIR/containerd2-pkg
# runsc from bookworm-backports, unpacked; the adapter runs the runsc beside
# it ($DEV_DIR/bin/runsc, a link into RUNSC_PKG_DIR).
RUNSC_PKG_DIR=$DEV_DIR/runsc-pkg
RUNSC_SUITE=bookworm-backports
IMAGES_DIR=$DEV_DIR/images
BUILD_DIR=$DEV_DIR/build
# The runsc handler's BinaryName: a copy, so a rebuild never swaps the
# binary under a running containerd.
RUNSC_ADAPTER=$DEV_DIR/bin/fast-sandbox-runsc
RUNSC=$DEV_DIR/bin/runsc
REGISTRY_DIR=$DEV_DIR/registry
REGISTRY_CONFIG=$REGISTRY_DIR/config.yml
REGISTRY_PIDFILE=$REGISTRY_DIR/registry.pid
REGISTRY_LOG=$REGISTRY_DIR/registry.log
ENV_FILE=$DEV_DIR/env

# Names under localhost/ are never resolved on a public registry; if one
# were ever missing, containerd would only try localhost itself.
PAUSE_IMAGE=localhost/fast-sandbox/pause:v1
TEST_IMAGE=localhost/fast-sandbox/busybox:v1
REGISTRY_REPO=fast-sandbox/busybox:v1

# Not Debian 12's runsc (2022-12): the node runs bookworm-backports' (see
# unpack_runsc), and a runsc of another release cannot read its state.
PACKAGES=(
	containerd runc crun containernetworking-plugins iptables iproute2
	busybox-static protobuf-compiler gcc libc6-dev docker-registry skopeo
)

STEP="starting"
LAST_LOG=
on_error() {
	fsb_log "error: $STEP failed (line $1: $2)"
	if [[ -n $LAST_LOG && -s $LAST_LOG ]]; then
		fsb_log "log: $LAST_LOG (last lines):"
		tail -n 15 "$LAST_LOG" | sed 's/^/    /' >&2
	fi
	exit 1
}

step() {
	STEP=$1
	LAST_LOG=${2:-}
	fsb_log "$STEP"
}

registry_pid() {
	local pid
	pid=$(cat "$REGISTRY_PIDFILE" 2>/dev/null || true)
	if fsb_pid_alive "$pid" && [[ $(fsb_cmdline "$pid") == *"serve $REGISTRY_CONFIG "* ]]; then
		printf '%s\n' "$pid"
		return 0
	fi
	fsb_pids_matching "serve $REGISTRY_CONFIG " | sed -n 1p # reads all: no SIGPIPE under pipefail
}

registry_answers() {
	# Not `wget -T`: it segfaults in Debian 12's busybox-static 1.35.
	timeout 3 busybox wget -q -O /dev/null "http://127.0.0.1:$1/v2/" 2>/dev/null
}

port_free() {
	[[ -z $(ss -Hltn "sport = :$1" 2>/dev/null) ]]
}

start_registry() {
	local pid port
	pid=$(registry_pid)
	port=$(cat "$REGISTRY_DIR/port" 2>/dev/null || true)
	if [[ -n $pid && -n $port ]] && registry_answers "$port"; then
		fsb_log "registry already running on 127.0.0.1:$port (pid $pid)"
		REGISTRY_PORT=$port
		return 0
	fi
	[[ -n $pid ]] && fsb_kill_pids "$pid"
	port=$FIRST_PORT
	until port_free "$port"; do
		port=$((port + 1))
		((port < FIRST_PORT + 100)) || fsb_die "no free port in $FIRST_PORT..$((FIRST_PORT + 99)) for the registry"
	done
	mkdir -p "$REGISTRY_DIR/data"
	cat >"$REGISTRY_CONFIG" <<-EOF
		# Written by hack/dev-node.sh: a registry for PullImage tests, on loopback only.
		version: 0.1
		log:
		  level: info
		storage:
		  filesystem:
		    rootdirectory: $REGISTRY_DIR/data
		  delete:
		    enabled: true
		http:
		  addr: 127.0.0.1:$port
	EOF
	printf -- '--- %s start\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$REGISTRY_LOG"
	(cd / && exec setsid docker-registry serve "$REGISTRY_CONFIG") </dev/null >>"$REGISTRY_LOG" 2>&1 &
	pid=$!
	printf '%s\n' "$pid" >"$REGISTRY_PIDFILE"
	printf '%s\n' "$port" >"$REGISTRY_DIR/port"
	local deadline=$((SECONDS + 20))
	until registry_answers "$port"; do
		fsb_pid_alive "$pid" || on_error "$LINENO" "docker-registry exited"
		((SECONDS < deadline)) || on_error "$LINENO" "registry on 127.0.0.1:$port not answering after 20s"
		sleep 0.2
	done
	fsb_log "registry on 127.0.0.1:$port (pid $pid)"
	REGISTRY_PORT=$port
}

# Downloads PKG (apt syntax, e.g. `runsc` or `runsc=VERSION`) from Debian
# suite SUITE into $CACHE_DIR/debs once (a cached .deb matching GLOB is
# reused) and unpacks it with dpkg -x into DEST (again only when the .deb
# changed). SUITE is never a system source: a sources file and package lists
# of our own under $CACHE_DIR/apt-SUITE. Sets DEB to the .deb used.
unpack_deb() {
	local suite=$1 pkg=$2 glob=$3 dest=$4
	local debs=$CACHE_DIR/debs apt_dir=$CACHE_DIR/apt-$suite
	mkdir -p "$debs" "$apt_dir/lists/partial"
	DEB=$(find "$debs" -maxdepth 1 -name "$glob" | sort -V | tail -n 1)
	if [[ -z $DEB ]]; then
		printf 'deb http://deb.debian.org/debian %s main\n' "$suite" >"$apt_dir/sources.list"
		local apt=(apt-get -q -o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
			-o "Dir::State::Lists=$apt_dir/lists")
		fsb_log "apt-get update (Debian $suite, private lists in $apt_dir)"
		"${apt[@]}" update >"$apt_dir/update.log" 2>&1 || on_error "$LINENO" "apt-get update for $suite failed (log $apt_dir/update.log)"
		fsb_log "downloading $pkg from Debian $suite into $debs"
		(cd "$debs" && "${apt[@]}" download "$pkg") >"$apt_dir/download.log" 2>&1 ||
			on_error "$LINENO" "apt-get download $pkg failed (log $apt_dir/download.log)"
		DEB=$(find "$debs" -maxdepth 1 -name "$glob" | sort -V | tail -n 1)
		[[ -n $DEB ]] || on_error "$LINENO" "apt-get download $pkg left no $glob in $debs"
	else
		fsb_log "using the cached $(basename "$DEB")"
	fi
	local stamp=$dest/.from
	if [[ $(cat "$stamp" 2>/dev/null) != "$(basename "$DEB")" ]]; then
		fsb_log "unpacking $(basename "$DEB") into $dest (dpkg -x, not installed)"
		rm -rf "$dest"
		dpkg -x "$DEB" "$dest"
		basename "$DEB" >"$stamp"
	fi
}

# containerd 2.x from Debian unstable, unpacked; sets CONTAINERD2_BIN and
# CONTAINERD2_VERSION.
unpack_containerd2() {
	local glibc
	glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
	if [[ $(printf '%s\n2.34\n' "$glibc" | sort -V | head -n 1) != 2.34 ]]; then
		on_error "$LINENO" "containerd 2.x from Debian unstable needs glibc >= 2.34; this machine has $glibc"
	fi
	local version=${FAST_SANDBOX_CONTAINERD2_VERSION:-} pkg=containerd
	[[ -n $version ]] && pkg=containerd=$version
	unpack_deb unstable "$pkg" "containerd_${version:-2.}*_amd64.deb" "$PKG2_DIR"
	CONTAINERD2_BIN=$PKG2_DIR/usr/bin
	CONTAINERD2_VERSION=$("$CONTAINERD2_BIN/containerd" --version | awk '{print $3}')
	[[ $CONTAINERD2_VERSION == 2.* ]] ||
		on_error "$LINENO" "$(basename "$DEB") is containerd $CONTAINERD2_VERSION, not 2.x"
	[[ $CONTAINERD2_VERSION == 2.1.* ]] ||
		fsb_log "warning: Debian unstable now has containerd $CONTAINERD2_VERSION, not 2.1.x (pin FAST_SANDBOX_CONTAINERD2_VERSION)"
	fsb_log "containerd $CONTAINERD2_VERSION unpacked"
}

# runsc from bookworm-backports (a static Go binary), unpacked and linked
# beside the adapter as $RUNSC. Debian's version strings (0.0~20240729.0)
# name the gVisor release.
unpack_runsc() {
	local version=${FAST_SANDBOX_RUNSC_VERSION:-} pkg=runsc
	[[ -n $version ]] && pkg=runsc=$version
	unpack_deb "$RUNSC_SUITE" "$pkg" "runsc_${version:-}*_amd64.deb" "$RUNSC_PKG_DIR"
	local runsc_version
	runsc_version=$("$RUNSC_PKG_DIR/usr/bin/runsc" --version | awk 'NR == 1 {print $3}') ||
		on_error "$LINENO" "$RUNSC_PKG_DIR/usr/bin/runsc does not run"
	mkdir -p "$(dirname "$RUNSC")"
	ln -sfn "$RUNSC_PKG_DIR/usr/bin/runsc" "$RUNSC"
	fsb_log "runsc $runsc_version unpacked ($RUNSC)"
}

cmd_up() {
	trap 'on_error $LINENO "$BASH_COMMAND"' ERR
	fsb_require_root
	mkdir -p "$DEV_DIR" "$IMAGES_DIR" "$BUILD_DIR" "$REGISTRY_DIR"

	step "installing packages"
	fsb_ensure_packages "${PACKAGES[@]}"
	command -v cargo >/dev/null || fsb_die "cargo not found: install a Rust toolchain (rustup; Debian's rustc is too old for this workspace)"

	step "building fast-sandbox-dev and fast-sandbox-runsc (cargo build --release, log $BUILD_DIR/cargo.log)" "$BUILD_DIR/cargo.log"
	(cd "$FSB_REPO" && cargo build --release -p fast-sandbox-devtool -p fast-sandbox-runsc-adapter) >"$BUILD_DIR/cargo.log" 2>&1
	local devtool
	devtool=$(fsb_cargo_target_dir)/release/fast-sandbox-dev
	[[ -x $devtool ]] || on_error "$LINENO" "cargo built no $devtool"
	export FAST_SANDBOX_DEVTOOL=$devtool
	mkdir -p "$(dirname "$RUNSC_ADAPTER")"
	install -m 0755 "$(fsb_cargo_target_dir)/release/fast-sandbox-runsc" "$RUNSC_ADAPTER.tmp"
	mv -f "$RUNSC_ADAPTER.tmp" "$RUNSC_ADAPTER"

	step "getting runsc from Debian $RUNSC_SUITE"
	unpack_runsc

	step "building the pause binary" "$BUILD_DIR/pause.log"
	gcc -static -Os -s -Wall -Wextra -Werror -o "$BUILD_DIR/pause.tmp" "$FSB_REPO/hack/pause/pause.c" >"$BUILD_DIR/pause.log" 2>&1
	mv -f "$BUILD_DIR/pause.tmp" "$BUILD_DIR/pause"

	step "building images $PAUSE_IMAGE and $TEST_IMAGE"
	"$devtool" image pause --binary "$BUILD_DIR/pause" --name "$PAUSE_IMAGE" --out "$IMAGES_DIR/pause.tar" >&2
	"$devtool" image rootfs --busybox "$(command -v busybox)" --name "$TEST_IMAGE" --out "$IMAGES_DIR/busybox.tar" >&2

	step "starting the image registry" "$REGISTRY_LOG"
	start_registry
	local registry=127.0.0.1:$REGISTRY_PORT registry_image=127.0.0.1:$REGISTRY_PORT/$REGISTRY_REPO

	# Built under its registry name, so its content differs from the
	# imported test image: a PullImage of it really downloads a layer.
	step "pushing $registry_image" "$REGISTRY_LOG"
	"$devtool" image rootfs --busybox "$(command -v busybox)" --name "$registry_image" \
		--out "$REGISTRY_DIR/busybox.tar" >&2
	skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
		"oci-archive:$REGISTRY_DIR/busybox.tar" "docker://$registry_image" >&2

	step "starting containerd at $INSTANCE_DIR" "$INSTANCE_DIR/containerd.log"
	"$INSTANCE_SCRIPT" start "$INSTANCE_DIR" --cni-subnet "$SUBNET" --bridge "$BRIDGE" \
		--sandbox-image "$PAUSE_IMAGE" --import "$IMAGES_DIR/pause.tar" --import "$IMAGES_DIR/busybox.tar" \
		--plain-http-registry "$registry" --runtime "runsc=$RUNSC_ADAPTER"

	local c2_exports=()
	if [[ ${FAST_SANDBOX_CONTAINERD2:-} == 1 ]]; then
		step "getting containerd 2.x from Debian unstable"
		unpack_containerd2
		step "starting containerd $CONTAINERD2_VERSION at $INSTANCE2_DIR" "$INSTANCE2_DIR/containerd.log"
		"$INSTANCE_SCRIPT" start "$INSTANCE2_DIR" --containerd-bin "$CONTAINERD2_BIN" \
			--cni-subnet "$SUBNET2" --bridge "$BRIDGE2" \
			--sandbox-image "$PAUSE_IMAGE" --import "$IMAGES_DIR/pause.tar" --import "$IMAGES_DIR/busybox.tar" \
			--plain-http-registry "$registry" --runtime "runsc=$RUNSC_ADAPTER"
		c2_exports=(
			"FAST_SANDBOX_CONTAINERD2_VERSION=$CONTAINERD2_VERSION"
			"FAST_SANDBOX_CONTAINERD2_ENDPOINT=unix://$INSTANCE2_DIR/containerd.sock"
			"FAST_SANDBOX_CONTAINERD2_ROOT=$INSTANCE2_DIR/root"
			"FAST_SANDBOX_CONTAINERD2_STATE=$INSTANCE2_DIR/state"
			"FAST_SANDBOX_CONTAINERD2_LOG=$INSTANCE2_DIR/containerd.log"
			"FAST_SANDBOX_CONTAINERD2_CNI_SUBNET=$SUBNET2"
			"FAST_SANDBOX_CONTAINERD2_BRIDGE=$BRIDGE2"
		)
	fi

	step "writing $ENV_FILE"
	fsb_write_exports "$ENV_FILE" "${c2_exports[@]}" \
		"FAST_SANDBOX_DEV_DIR=$DEV_DIR" \
		"FAST_SANDBOX_CONTAINERD_ENDPOINT=unix://$INSTANCE_DIR/containerd.sock" \
		"FAST_SANDBOX_CONTAINERD_ROOT=$INSTANCE_DIR/root" \
		"FAST_SANDBOX_CONTAINERD_STATE=$INSTANCE_DIR/state" \
		"FAST_SANDBOX_CONTAINERD_LOG=$INSTANCE_DIR/containerd.log" \
		"FAST_SANDBOX_PAUSE_IMAGE=$PAUSE_IMAGE" \
		"FAST_SANDBOX_TEST_IMAGE=$TEST_IMAGE" \
		"FAST_SANDBOX_REGISTRY=$registry" \
		"FAST_SANDBOX_REGISTRY_IMAGE=$registry_image" \
		"FAST_SANDBOX_CNI_SUBNET=$SUBNET" \
		"FAST_SANDBOX_BRIDGE=$BRIDGE" \
		"FAST_SANDBOX_IMAGES_DIR=$IMAGES_DIR" \
		"FAST_SANDBOX_INSTANCE_SCRIPT=$INSTANCE_SCRIPT" \
		"FAST_SANDBOX_DEVTOOL=$devtool" \
		"FAST_SANDBOX_RUNSC_ADAPTER=$RUNSC_ADAPTER" \
		"FAST_SANDBOX_RUNSC=$RUNSC"

	if [[ ${FAST_SANDBOX_SKIP_SMOKE:-} != 1 ]]; then
		local handler
		for handler in runc crun runsc; do
			step "smoke pod with handler $handler" "$INSTANCE_DIR/containerd.log"
			"$devtool" cri smoke --endpoint "unix://$INSTANCE_DIR/containerd.sock" --image "$TEST_IMAGE" \
				--handler "$handler" --dns-server "$(gateway "$SUBNET")" >/dev/null
		done
		if [[ ${FAST_SANDBOX_CONTAINERD2:-} == 1 ]]; then
			# Not crun: Debian 12's crun 1.8.1 refuses containerd 2.1's OCI
			# spec ("OCI runtime create failed: unknown version specified").
			for handler in runc runsc; do
				step "smoke pod with handler $handler on containerd $CONTAINERD2_VERSION" "$INSTANCE2_DIR/containerd.log"
				"$devtool" cri smoke --endpoint "unix://$INSTANCE2_DIR/containerd.sock" --image "$TEST_IMAGE" \
					--handler "$handler" --dns-server "$(gateway "$SUBNET2")" >/dev/null
			done
		fi
	fi
	step "checking PullImage of $registry_image" "$INSTANCE_DIR/containerd.log"
	"$devtool" cri pull --endpoint "unix://$INSTANCE_DIR/containerd.sock" --image "$registry_image" \
		--check-and-remove >/dev/null
	fsb_log "up: . $ENV_FILE"
}

# The bridge's address (first host of the subnet): a nameserver inside the
# node's own range, so no pod ever uses the host's resolvers.
gateway() {
	local addr=${1%/*}
	printf '%s.%s\n' "${addr%.*}" "$((${addr##*.} + 1))"
}

cmd_down() {
	fsb_require_root
	STEP="down"
	fsb_log "stopping the containerd instance"
	if [[ -f $INSTANCE_DIR/instance.env ]]; then
		# The instance knows the network it was started with.
		"$INSTANCE_SCRIPT" stop "$INSTANCE_DIR" --purge
	elif [[ -d $INSTANCE_DIR ]] || ip link show dev "$BRIDGE" >/dev/null 2>&1; then
		"$INSTANCE_SCRIPT" stop "$INSTANCE_DIR" --purge --cni-subnet "$SUBNET" --bridge "$BRIDGE"
	fi
	if [[ -f $INSTANCE2_DIR/instance.env ]]; then
		fsb_log "stopping the containerd 2 instance"
		"$INSTANCE_SCRIPT" stop "$INSTANCE2_DIR" --purge
	elif [[ -d $INSTANCE2_DIR ]]; then
		"$INSTANCE_SCRIPT" stop "$INSTANCE2_DIR" --purge --cni-subnet "$SUBNET2" --bridge "$BRIDGE2"
	fi
	local pid
	pid=$(registry_pid)
	if [[ -n $pid ]]; then
		fsb_log "stopping the registry (pid $pid)"
		fsb_kill_pids "$pid"
	fi
	fsb_log "removing $DEV_DIR"
	fsb_unmount_under "$DEV_DIR"
	fsb_remove_tree "$DEV_DIR"
	fsb_log "down"
}

cmd_env() {
	[[ -f $ENV_FILE ]] || fsb_die "$ENV_FILE not found: run hack/dev-node.sh up"
	cat "$ENV_FILE"
}

case ${1:-} in
up)
	fsb_become_root "$@"
	cmd_up
	;;
down)
	fsb_become_root "$@"
	cmd_down
	;;
env) cmd_env ;;
*)
	sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
	exit 2
	;;
esac
