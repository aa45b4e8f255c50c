#!/usr/bin/env bash
# A private containerd 1.6 instance living entirely under one directory, so
# tests never touch the host's containerd and several instances can run at
# once (different DIR, and a different bridge/subnet or no CNI at all).
#
# usage:
#   containerd-instance.sh start  DIR [--cni-subnet CIDR --bridge NAME]
#                                     [--sandbox-image REF] [--import TAR]...
#                                     [--plain-http-registry 127.0.0.1:PORT]...
#                                     [--runtime NAME=BINARY]...
#                                     [--containerd-bin DIR]
#                                     [--timeout SECONDS]
#   containerd-instance.sh stop   DIR [--purge]
#   containerd-instance.sh status DIR
#
# start: writes DIR/config.toml (`containerd config default` plus this
#   project's tweaks, see fast-sandbox-dev instance-config), starts containerd
#   in the background (DIR/containerd.pid, DIR/containerd.log), waits until its
#   CRI is ready and imports the image tars. Starting a running instance only
#   re-imports; starting one whose containerd died (kill -9) restarts it on the
#   same state, so it reconnects to the shims and pods that survived. Without
#   network options a restart reuses the instance's recorded ones.
# stop: removes every pod through the CRI while containerd lives, stops
#   containerd, kills what is left (runtime containers, shims), unmounts
#   everything under DIR, deletes the bridge and its iptables rules and the
#   instance's state. Idempotent; safe after a failed or half-done start.
#   Keeps DIR/containerd.log, DIR/config.toml and DIR/instance.env (the
#   recorded network, so a second stop or a later start knows it) unless
#   --purge.
# status: exit 0 and "running ..." when containerd runs, else exit 3.
# --runtime adds handler NAME on containerd's runc v2 shim with BinaryName
#   BINARY, e.g. runsc=/path/to/fast-sandbox-runsc (gVisor, see
#   docs/runtimes.md); recorded, so a restart keeps it.
# --containerd-bin DIR runs the containerd, containerd-shim-runc-v2 and ctr
#   in DIR instead of the system's (e.g. containerd 2.1 unpacked from
#   Debian unstable's package by dev-node.sh; DIR goes first on containerd's
#   PATH so its own shim is used). The config is written in that containerd's
#   own format (version 3 for containerd 2.x). Recorded, so a restart and
#   stop use the same binaries.
#
# Defaults come from the dev-node env file when it is sourced, else from the
# development node at ${FAST_SANDBOX_DEV_DIR:-/var/lib/fast-sandbox-dev}:
#   --sandbox-image   $FAST_SANDBOX_PAUSE_IMAGE (else localhost/fast-sandbox/pause:v1)
#   --import          every $FAST_SANDBOX_IMAGES_DIR/*.tar (else DEV_DIR/images/*.tar)
#   --plain-http-registry  $FAST_SANDBOX_REGISTRY (else the dev node's registry)
#   the devtool       $FAST_SANDBOX_DEVTOOL (else target/release/fast-sandbox-dev)
#
# DIR holds: config.toml, containerd.sock(.ttrpc), containerd.pid,
# containerd.log, instance.env, root/, state/ (pod netns are in
# state/io.containerd.grpc.v1.cri/netns), runtime/{runc,crun}/, opt/, tmp/,
# cni/{conf,ipam}/, certs.d/. Outside DIR: containerd 1.6 hard-codes shim
# sockets to /run/containerd/s/<sha256(address, namespace, id)> (distinct per
# instance because the address is hashed in); stop removes ours.
set -Eeuo pipefail

FSB_LOG_NAME=containerd-instance
# shellcheck source=hack/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
	sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
	exit 2
}

(($# >= 2)) || usage
COMMAND=$1
DIR=$(realpath -m -- "$2")
shift 2

CONFIG=$DIR/config.toml
SOCK=$DIR/containerd.sock
ENDPOINT=unix://$SOCK
PIDFILE=$DIR/containerd.pid
LOG=$DIR/containerd.log
INSTANCE_ENV=$DIR/instance.env
RUNTIMES=(runc crun)
# The command for a runtime in RUNTIMES, when not its own name (--runtime).
declare -A RUNTIME_BIN=()

OPT_SUBNET='' OPT_BRIDGE='' OPT_IMAGE='' OPT_TIMEOUT=60 OPT_PURGE='' OPT_BIN=''
OPT_IMPORTS=() OPT_REGISTRIES=() OPT_RUNTIMES=()
while (($# > 0)); do
	case $1 in
	--cni-subnet) OPT_SUBNET=${2:?--cni-subnet needs a CIDR}; shift 2 ;;
	--bridge) OPT_BRIDGE=${2:?--bridge needs a name}; shift 2 ;;
	--sandbox-image) OPT_IMAGE=${2:?--sandbox-image needs a reference}; shift 2 ;;
	--import) OPT_IMPORTS+=("$(realpath -- "${2:?--import needs a tar}")"); shift 2 ;;
	--plain-http-registry) OPT_REGISTRIES+=("${2:?--plain-http-registry needs HOST:PORT}"); shift 2 ;;
	--runtime) OPT_RUNTIMES+=("${2:?--runtime needs NAME=BINARY}"); shift 2 ;;
	--containerd-bin) OPT_BIN=$(realpath -- "${2:?--containerd-bin needs a directory}"); shift 2 ;;
	--timeout) OPT_TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
	--purge) OPT_PURGE=1; shift ;;
	-h | --help) usage ;;
	*) fsb_die "unknown option ${1@Q} (see --help)" ;;
	esac
done
[[ -n $OPT_SUBNET && -z $OPT_BRIDGE || -z $OPT_SUBNET && -n $OPT_BRIDGE ]] &&
	fsb_die "--cni-subnet and --bridge go together"

# Fails with the last lines of the containerd log.
die_with_log() {
	fsb_log "error: $*"
	if [[ -s $LOG ]]; then
		fsb_log "containerd log: $LOG (last lines):"
		tail -n 15 "$LOG" | sed 's/^/    /' >&2
	fi
	exit 1
}

on_error() {
	die_with_log "command failed (line $1): $2"
}

# The containerd serving this instance, from the pid file or, if that is
# stale or lost, from the process list (its --config is unique to DIR).
running_pid() {
	local pid
	pid=$(cat "$PIDFILE" 2>/dev/null || true)
	if fsb_pid_alive "$pid" && [[ $(fsb_cmdline "$pid") == *"containerd --config $CONFIG "* ]]; then
		printf '%s\n' "$pid"
		return 0
	fi
	fsb_pids_matching "containerd --config $CONFIG " | sed -n 1p # reads all: no SIGPIPE under pipefail
}

# The directory of another running instance whose recorded bridge is $1.
bridge_owner() {
	local bridge=$1 pid config other_dir
	[[ -n $bridge ]] || return 0
	for pid in $(fsb_pids_matching "containerd --config "); do
		config=$(fsb_cmdline "$pid" | sed -n 's/.*containerd --config \([^ ]*\) .*/\1/p')
		other_dir=$(dirname "${config:-/nonexistent/x}")
		[[ $other_dir == "$DIR" ]] && continue
		if grep -qx "FSB_BRIDGE=$bridge" "$other_dir/instance.env" 2>/dev/null; then
			printf '%s\n' "$other_dir"
			return 0
		fi
	done
}

# The network settings this instance was started with (instance.env).
STORED_SUBNET='' STORED_BRIDGE='' STORED_RUNTIMES='' STORED_BIN=''
load_stored() {
	[[ -f $INSTANCE_ENV ]] || return 0
	STORED_SUBNET=$(sed -n 's/^FSB_CNI_SUBNET=//p' "$INSTANCE_ENV")
	STORED_BRIDGE=$(sed -n 's/^FSB_BRIDGE=//p' "$INSTANCE_ENV")
	STORED_RUNTIMES=$(sed -n 's/^FSB_RUNTIMES=//p' "$INSTANCE_ENV")
	STORED_BIN=$(sed -n 's/^FSB_CONTAINERD_BIN=//p' "$INSTANCE_ENV")
}

# The containerd and ctr commands of this instance (--containerd-bin).
CONTAINERD=containerd CTR=ctr SHIM_PATH=$FSB_PATH
use_bin_dir() {
	[[ -n $1 ]] || return 0
	[[ -x $1/containerd && -x $1/ctr && -x $1/containerd-shim-runc-v2 ]] ||
		fsb_die "--containerd-bin $1: containerd, ctr and containerd-shim-runc-v2 expected there"
	CONTAINERD=$1/containerd CTR=$1/ctr SHIM_PATH=$1:$FSB_PATH
}

# Adds NAME=BINARY runtimes to RUNTIMES/RUNTIME_BIN (for the leftover sweep).
add_runtimes() {
	local runtime
	for runtime in "$@"; do
		RUNTIMES+=("${runtime%%=*}")
		RUNTIME_BIN[${runtime%%=*}]=${runtime#*=}
	done
}

cmd_start() {
	trap 'on_error $LINENO "$BASH_COMMAND"' ERR
	fsb_require_root
	local devtool subnet bridge image pid before after
	load_stored
	subnet=${OPT_SUBNET:-$STORED_SUBNET}
	bridge=${OPT_BRIDGE:-$STORED_BRIDGE}
	local bin_dir=${OPT_BIN:-$STORED_BIN}
	use_bin_dir "$bin_dir"
	if [[ -n $OPT_SUBNET && -n $STORED_SUBNET && ($OPT_SUBNET != "$STORED_SUBNET" || $OPT_BRIDGE != "$STORED_BRIDGE") ]]; then
		fsb_die "$DIR was started with --cni-subnet $STORED_SUBNET --bridge $STORED_BRIDGE; stop it before changing its network"
	fi
	image=${OPT_IMAGE:-${FAST_SANDBOX_PAUSE_IMAGE:-localhost/fast-sandbox/pause:v1}}
	local dev_dir=${FAST_SANDBOX_DEV_DIR:-/var/lib/fast-sandbox-dev}
	local images_dir=${FAST_SANDBOX_IMAGES_DIR:-$dev_dir/images}
	if ((${#OPT_IMPORTS[@]} == 0)) && [[ -d $images_dir ]]; then
		mapfile -t OPT_IMPORTS < <(find "$images_dir" -maxdepth 1 -name '*.tar' | sort)
	fi
	local registry=${FAST_SANDBOX_REGISTRY:-}
	if [[ -z $registry && -s $dev_dir/registry/port ]]; then
		registry=127.0.0.1:$(cat "$dev_dir/registry/port")
	fi
	if ((${#OPT_REGISTRIES[@]} == 0)) && [[ -n $registry ]]; then
		OPT_REGISTRIES=("$registry")
	fi
	# Two instances on one bridge would break each other's pods, and the
	# first to stop would delete the bridge under the other.
	local owner
	owner=$(bridge_owner "$bridge")
	[[ -z $owner ]] || fsb_die "bridge $bridge is already used by the running instance at $owner"

	if [[ -n $bin_dir ]]; then
		fsb_ensure_packages runc crun containernetworking-plugins iptables iproute2
	else
		fsb_ensure_packages containerd runc crun containernetworking-plugins iptables iproute2
	fi
	# portmap creates its top-level nat chains on first use, and two pods
	# started at once race to create them ("CHAIN_USER_ADD failed (File
	# exists)"): make them up front, as the first pods of a node find them.
	local chain
	for chain in CNI-HOSTPORT-DNAT CNI-HOSTPORT-SETMARK CNI-HOSTPORT-MASQ; do
		iptables -t nat -N "$chain" 2>/dev/null || true
	done
	devtool=$(fsb_devtool)
	mkdir -p "$DIR"

	local config_args=(--base "$DIR/config.default.toml" --dir "$DIR" --sandbox-image "$image")
	[[ -n $subnet ]] && config_args+=(--cni-subnet "$subnet" --bridge "$bridge")
	for registry in "${OPT_REGISTRIES[@]}"; do
		config_args+=(--plain-http-registry "$registry")
	done
	if ((${#OPT_RUNTIMES[@]} == 0)) && [[ -n $STORED_RUNTIMES ]]; then
		read -r -a OPT_RUNTIMES <<<"$STORED_RUNTIMES"
	fi
	local runtime
	for runtime in "${OPT_RUNTIMES[@]}"; do
		config_args+=(--runtime "$runtime")
	done
	add_runtimes "${OPT_RUNTIMES[@]}"
	"$CONTAINERD" config default >"$DIR/config.default.toml"
	before=$({ cat "$CONFIG" 2>/dev/null || true; } | sha256sum)
	"$devtool" instance-config "${config_args[@]}"
	after=$(sha256sum <"$CONFIG")
	# Recorded before anything is created that stop must know about.
	printf 'FSB_CNI_SUBNET=%s\nFSB_BRIDGE=%s\nFSB_RUNTIMES=%s\nFSB_CONTAINERD_BIN=%s\n' \
		"$subnet" "$bridge" "${OPT_RUNTIMES[*]}" "$bin_dir" >"$INSTANCE_ENV"
	fsb_ensure_hugetlb_cgroup

	pid=$(running_pid)
	if [[ -n $pid ]]; then
		fsb_log "containerd already running at $DIR (pid $pid)"
		[[ $before == "$after" ]] ||
			fsb_log "warning: $CONFIG changed while containerd runs; stop and start the instance to apply it"
	else
		mkdir -p "$DIR"/{root,state,tmp,opt,cni/ipam} "${RUNTIMES[@]/#/$DIR/runtime/}"
		fsb_log "starting $("$CONTAINERD" --version | awk '{print $1, $3}') at $DIR (log $LOG)"
		printf -- '--- %s start\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$LOG"
		# setsid: a daemon, not a member of the caller's process group or session.
		(cd / && PATH=$SHIM_PATH exec setsid "$CONTAINERD" --config "$CONFIG") </dev/null >>"$LOG" 2>&1 &
		pid=$!
		printf '%s\n' "$pid" >"$PIDFILE"
	fi

	local wait_args=(cri wait --endpoint "$ENDPOINT" --timeout 2s) deadline=$((SECONDS + OPT_TIMEOUT))
	[[ -z $subnet ]] && wait_args+=(--no-network)
	until "$devtool" "${wait_args[@]}" 2>"$DIR/.wait.err"; do
		fsb_pid_alive "$pid" || die_with_log "containerd (pid $pid) exited during start-up"
		((SECONDS < deadline)) || die_with_log "CRI not ready after ${OPT_TIMEOUT}s: $(tail -n 1 "$DIR/.wait.err")"
	done
	rm -f "$DIR/.wait.err"
	# The pid as seen by the process table (setsid does not fork here, but be sure).
	local real
	real=$(running_pid)
	[[ -n $real ]] || die_with_log "containerd with --config $CONFIG not found after start"
	printf '%s\n' "$real" >"$PIDFILE"

	local tar
	for tar in "${OPT_IMPORTS[@]}"; do
		fsb_log "importing $(basename "$tar")"
		"$CTR" --address "$SOCK" --namespace k8s.io images import "$tar" >/dev/null ||
			die_with_log "import of $tar failed"
	done
	local images
	images=$("$CTR" --address "$SOCK" --namespace k8s.io images list --quiet)
	if ! grep -qxF "$image" <<<"$images"; then
		fsb_log "warning: sandbox image $image is not in this instance: RunPodSandbox would try to pull it (--import its tar)"
	fi
	local network="no CNI: host-network pods only"
	[[ -n $subnet ]] && network="pods on $subnet via $bridge"
	fsb_log "ready: $ENDPOINT (pid $real, $network)"
}

# Kills what a dead or unresponsive containerd left behind: runtime
# containers (by their state under DIR/runtime), shims (by their -address),
# and the cgroups of this instance's containers.
kill_leftovers() {
	local runtime root id ids=()
	mapfile -t ids < <(find "$DIR/state/io.containerd.runtime.v2.task" -mindepth 2 -maxdepth 2 -type d -printf '%f\n' 2>/dev/null || true)
	for runtime in "${RUNTIMES[@]}"; do
		local bin=${RUNTIME_BIN[$runtime]:-$runtime}
		for root in "$DIR/runtime/$runtime"/*/; do
			[[ -d $root ]] || continue
			for id in $("$bin" --root "$root" list -q 2>/dev/null || true); do
				fsb_log "deleting leftover $runtime container $id"
				"$bin" --root "$root" delete --force "$id" >/dev/null 2>&1 ||
					fsb_log "warning: $runtime delete --force $id failed"
			done
		done
	done

	local shims=()
	mapfile -t shims < <(fsb_pids_matching "-address $SOCK ")
	if ((${#shims[@]} > 0)); then
		fsb_log "killing ${#shims[@]} leftover shim(s): ${shims[*]}"
		FSB_KILL_GRACE=3 fsb_kill_pids "${shims[@]}"
	fi
	# The runsc adapter's waiters (docs/runtimes.md) of containers runsc no
	# longer lists: seen on containerd 2.1 when a RunPodSandbox is cancelled
	# during the shim's create (containerd drops the shim, its cleanup fails
	# with "getwd: no such file or directory", nobody deletes the container).
	# Their FIFO lies under this instance's runtime roots.
	local waiters=()
	mapfile -t waiters < <(fsb_pids_matching "__fast-sandbox-runsc-waiter $DIR/runtime/")
	if ((${#waiters[@]} > 0)); then
		fsb_log "killing ${#waiters[@]} leftover runsc adapter waiter(s): ${waiters[*]}"
		fsb_kill_pids "${waiters[@]}"
	fi
	local address socket
	for address in "$DIR"/state/io.containerd.runtime.v2.task/*/*/address; do
		[[ -f $address ]] || continue
		socket=$(sed 's#^unix://##' "$address")
		[[ $socket == /run/containerd/s/* ]] && rm -f "$socket"
	done
	remove_stale_shim_sockets
	local cgroup
	for id in "${ids[@]}"; do
		for cgroup in /sys/fs/cgroup/*/k8s.io/"$id"; do
			[[ -d $cgroup ]] && { rmdir "$cgroup" 2>/dev/null || true; }
		done
	done
	return 0
}

# A shim that dies by SIGKILL leaves its socket in /run/containerd/s, and
# containerd 1.6 does not remove it when it cleans up after the shim. The
# name is sha256(<our address>/<namespace>/<id>): among the sockets nobody
# listens on, remove those whose name matches an id in our log.
remove_stale_shim_sockets() {
	local sock listening stale=()
	[[ -d /run/containerd/s && -f $LOG ]] || return 0
	listening=$(ss -xlH 2>/dev/null | awk '{print $5}')
	for sock in /run/containerd/s/*; do
		[[ -S $sock ]] || continue
		grep -qxF "$sock" <<<"$listening" || stale+=("$sock")
	done
	((${#stale[@]} > 0)) || return 0
	local id hash
	local -A ours=()
	while read -r id; do
		hash=$(printf '%s' "$SOCK/k8s.io/$id" | sha256sum)
		ours[${hash%% *}]=1
	done < <(grep -o '[0-9a-f]\{64\}' "$LOG" | sort -u)
	for sock in "${stale[@]}"; do
		if [[ -n ${ours[$(basename "$sock")]:-} ]]; then
			fsb_log "removing stale shim socket $sock"
			rm -f "$sock"
		fi
	done
}

cmd_stop() {
	fsb_require_root
	load_stored
	local subnet=${OPT_SUBNET:-$STORED_SUBNET} bridge=${OPT_BRIDGE:-$STORED_BRIDGE} pid devtool
	local stored_runtimes=()
	read -r -a stored_runtimes <<<"$STORED_RUNTIMES"
	add_runtimes "${stored_runtimes[@]}"
	if [[ -d $DIR ]]; then
		pid=$(running_pid)
		if [[ -n $pid ]]; then
			if devtool=$(fsb_devtool 2>/dev/null); then
				fsb_log "removing all pods through the CRI"
				timeout 180 "$devtool" cri reset --endpoint "$ENDPOINT" ||
					fsb_log "warning: CRI reset failed; cleaning up by force"
			else
				fsb_log "warning: no devtool; skipping the CRI reset, cleaning up by force"
			fi
			fsb_log "stopping containerd (pid $pid)"
			fsb_kill_pids "$pid"
		fi
		kill_leftovers
		fsb_unmount_under "$DIR"
	fi
	local owner
	owner=$(bridge_owner "$bridge")
	if [[ -n $owner ]]; then
		fsb_log "warning: bridge $bridge belongs to the running instance at $owner; leaving it and its iptables rules alone"
		bridge='' subnet=''
	fi
	if [[ -n $bridge ]] && ip link show dev "$bridge" >/dev/null 2>&1; then
		fsb_log "deleting bridge $bridge"
		ip link delete dev "$bridge" || fsb_log "warning: cannot delete bridge $bridge"
	fi
	if [[ -n $subnet ]]; then
		# The portmap plugin's shared chains may go when no containerd is
		# left that could own a hostPort rule in them.
		local shared=
		[[ -z $(fsb_pids_named containerd) ]] && shared=drop-shared
		fsb_iptables_cleanup "$subnet" "$bridge" "fast-sandbox-$bridge" $shared
	fi
	if [[ -d $DIR ]]; then
		if [[ -n $OPT_PURGE ]]; then
			fsb_remove_tree "$DIR"
		else
			fsb_remove_tree "$DIR"/{root,state,tmp,opt,runtime,cni,certs.d} \
				"$DIR"/{containerd.sock,containerd.sock.ttrpc,containerd.pid,config.default.toml,.wait.err}
		fi
	fi
	fsb_log "stopped: $DIR"
}

cmd_status() {
	local pid subnet
	pid=$(running_pid)
	load_stored
	if [[ -n $pid ]]; then
		local wait_args=(cri wait --endpoint "$ENDPOINT" --timeout 2s) ready="CRI not ready"
		[[ -z $STORED_SUBNET ]] && wait_args+=(--no-network)
		"$(fsb_devtool)" "${wait_args[@]}" 2>/dev/null && ready="CRI ready"
		echo "running: pid $pid, $ENDPOINT, $ready${STORED_SUBNET:+, pods on $STORED_SUBNET via $STORED_BRIDGE}"
		return 0
	fi
	local mounts shims
	mounts=$(fsb_mounts_under "$DIR" | grep -c '' || true)
	shims=$(fsb_pids_matching "-address $SOCK " | grep -c '' || true)
	echo "stopped: $DIR ($mounts mount(s), $shims shim(s) left${STORED_BRIDGE:+, bridge $STORED_BRIDGE recorded})"
	return 3
}

case $COMMAND in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) usage ;;
esac
