# Shared helpers for hack/*.sh. Source it; it defines functions and two
# variables (FSB_REPO, FSB_PATH), and expects `set -euo pipefail`.
# shellcheck shell=bash

FSB_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The PATH daemons get: containerd runs iptables (portmap) from /usr/sbin.
# shellcheck disable=SC2034
FSB_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Progress and errors go to stderr, prefixed with the script's name.
fsb_log() {
	printf '%s: %s\n' "${FSB_LOG_NAME:-$(basename "$0")}" "$*" >&2
}

fsb_die() {
	fsb_log "error: $*"
	exit 1
}

fsb_require_root() {
	[[ $(id -u) -eq 0 ]] || fsb_die "must run as root (containerd, mounts, bridges, iptables)"
}

# Re-runs the calling script as root when it is not, with the same
# arguments: through sudo, keeping the caller's PATH (rustup's cargo lives
# in ~/.cargo/bin), the caller's Rust toolchain homes and the settings the
# scripts read (CI, CARGO_TARGET_DIR, RUST_LOG, FAST_SANDBOX_*). As root
# (a fresh Debian root shell has no sudo) it returns at once.
fsb_become_root() {
	[[ $(id -u) -eq 0 ]] && return 0
	command -v sudo >/dev/null ||
		fsb_die "must run as root (containerd, mounts, bridges, iptables), and sudo is not installed: run it from a root shell"
	local keep=("PATH=$PATH") name home
	home=${CARGO_HOME:-$HOME/.cargo}
	[[ -d $home ]] && keep+=("CARGO_HOME=$home")
	home=${RUSTUP_HOME:-$HOME/.rustup}
	[[ -d $home ]] && keep+=("RUSTUP_HOME=$home")
	for name in $(compgen -e); do
		case $name in
		CI | CARGO_TARGET_DIR | RUST_LOG | FAST_SANDBOX_*) keep+=("$name=${!name}") ;;
		esac
	done
	fsb_log "not root: re-running as root with sudo"
	exec sudo -- env "${keep[@]}" "$(realpath -- "$0")" "$@"
}

# Cargo's target directory for this workspace (honours CARGO_TARGET_DIR and
# cargo config).
fsb_cargo_target_dir() {
	(cd "$FSB_REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null) |
		sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}

# The devtool binary: $FAST_SANDBOX_DEVTOOL, else the release build in this repo.
fsb_devtool() {
	local tool=${FAST_SANDBOX_DEVTOOL:-}
	if [[ -z $tool ]]; then
		tool=${CARGO_TARGET_DIR:-$FSB_REPO/target}/release/fast-sandbox-dev
	fi
	[[ -x $tool ]] || fsb_die "$tool not found; build it (cargo build --release -p fast-sandbox-devtool) or run hack/dev-node.sh up"
	printf '%s\n' "$tool"
}

# Installs the Debian packages that are not installed yet; runs
# `apt-get update` first, and only when something is missing.
fsb_ensure_packages() {
	local missing=() pkg
	for pkg in "$@"; do
		if [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) != installed ]]; then
			missing+=("$pkg")
		fi
	done
	((${#missing[@]} == 0)) && return 0
	fsb_log "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
		fsb_die "apt-get update failed"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
		fsb_die "apt-get install ${missing[*]} failed"
}

fsb_pid_alive() {
	[[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null
}

# The command line of a process, arguments separated by single spaces.
fsb_cmdline() {
	tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" || true
}

# PIDs whose command line contains the fixed string $1.
fsb_pids_matching() {
	local needle=$1 proc pid
	for proc in /proc/[0-9]*; do
		pid=${proc#/proc/}
		[[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
		case "$(fsb_cmdline "$pid")" in
		*"$needle"*) printf '%s\n' "$pid" ;;
		esac
	done
}

fsb_is_zombie() {
	[[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]]
}

# Live (not zombie) PIDs whose executable name (comm) is exactly $1.
fsb_pids_named() {
	local proc
	for proc in /proc/[0-9]*; do
		if [[ $(cat "$proc/comm" 2>/dev/null) == "$1" ]] && ! fsb_is_zombie "${proc#/proc/}"; then
			printf '%s\n' "${proc#/proc/}"
		fi
	done
	return 0
}

# Sends SIGTERM to the given PIDs, waits up to $FSB_KILL_GRACE seconds
# (default 10), then SIGKILLs what is left and waits for it to go.
fsb_kill_pids() {
	local pids=("$@") pid deadline alive
	((${#pids[@]} == 0)) && return 0
	kill -TERM "${pids[@]}" 2>/dev/null || true
	deadline=$((SECONDS + ${FSB_KILL_GRACE:-10}))
	while :; do
		alive=()
		for pid in "${pids[@]}"; do
			# A zombie still answers kill -0; treat it as gone.
			if fsb_pid_alive "$pid" && ! fsb_is_zombie "$pid"; then
				alive+=("$pid")
			fi
		done
		((${#alive[@]} == 0)) && return 0
		if ((SECONDS >= deadline)); then
			kill -KILL "${alive[@]}" 2>/dev/null || true
			deadline=$((SECONDS + 5))
			pids=("${alive[@]}")
			FSB_KILL_GRACE=5
		fi
		sleep 0.1
	done
}

# Mount points at or below $1, deepest (most recently mounted) first.
fsb_mounts_under() {
	local dir=${1%/}
	awk -v dir="$dir" '
		function unescape(s,   out, i, c) {
			out = ""
			for (i = 1; i <= length(s); i++) {
				c = substr(s, i, 1)
				if (c == "\\" && substr(s, i + 1, 3) ~ /^[0-7][0-7][0-7]$/) {
					out = out sprintf("%c", (substr(s, i + 1, 1) * 64) + (substr(s, i + 2, 1) * 8) + substr(s, i + 3, 1))
					i += 3
				} else {
					out = out c
				}
			}
			return out
		}
		{ mp = unescape($5); if (mp == dir || index(mp, dir "/") == 1) mounts[n++] = mp }
		END { for (i = n - 1; i >= 0; i--) print mounts[i] }
	' /proc/self/mountinfo
}

# Unmounts everything at or below $1, deepest first; lazily if it is busy.
fsb_unmount_under() {
	local dir=$1 mp round
	for round in 1 2 3 4 5; do
		local mounts=()
		mapfile -t mounts < <(fsb_mounts_under "$dir")
		((${#mounts[@]} == 0)) && return 0
		for mp in "${mounts[@]}"; do
			umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null ||
				fsb_log "warning: cannot unmount $mp (round $round)"
		done
	done
	[[ -z $(fsb_mounts_under "$dir") ]] || fsb_die "mounts remain under $dir: $(fsb_mounts_under "$dir" | tr '\n' ' ')"
}

# rm -rf that refuses to run while anything is mounted below the target and
# never crosses into another file system.
fsb_remove_tree() {
	local target
	for target in "$@"; do
		[[ -e $target || -L $target ]] || continue
		[[ $target == /* && $target != / ]] || fsb_die "refusing to remove ${target@Q}"
		[[ -z $(fsb_mounts_under "$target") ]] || fsb_die "refusing to remove $target: mounts remain below it"
		rm -rf --one-file-system -- "$target"
	done
}

# Succeeds when IPv4 address $2 is inside CIDR $1.
fsb_ip_in_cidr() {
	awk -v cidr="$1" -v ip="$2" '
		function num(a,   p) { split(a, p, "."); return ((p[1] * 256 + p[2]) * 256 + p[3]) * 256 + p[4] }
		BEGIN {
			split(cidr, c, "/"); size = 2 ^ (32 - c[2])
			base = int(num(c[1]) / size) * size
			exit !(num(ip) >= base && num(ip) < base + size)
		}'
}

# Removes iptables rules and chains that CNI plugins made for one network:
# rules naming the network ($3) in a comment, touching the bridge ($2), or
# addressing an IP in the subnet ($1); per-pod CNI chains holding such rules
# (or jumped to by them) are flushed and deleted. The portmap plugin's shared
# chains (CNI-HOSTPORT-*, and the jumps to them) go too when no hostPort rule
# of any network is left in them and $4 is "drop-shared"; the plugin
# re-creates them on its next ADD.
fsb_iptables_cleanup() {
	local subnet=$1 bridge=$2 netname=$3 shared=${4:-} table dump script
	command -v iptables-save >/dev/null || return 0
	for table in nat filter mangle; do
		dump=$(iptables-save -t "$table" 2>/dev/null) || continue
		script=$(awk -v cidr="$subnet" -v bridge="$bridge" -v netname="$netname" -v table="$table" \
			-v drop_shared="$([[ $shared == drop-shared ]] && echo 1 || echo 0)" '
			function num(a,   p) { split(a, p, "."); return ((p[1] * 256 + p[2]) * 256 + p[3]) * 256 + p[4] }
			function in_subnet(line,   rest, ip) {
				rest = line
				while (match(rest, /[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+/)) {
					ip = num(substr(rest, RSTART, RLENGTH))
					if (ip >= base && ip < base + size) return 1
					rest = substr(rest, RSTART + RLENGTH)
				}
				return 0
			}
			function ours(line,   n, f, i) {
				if (index(line, "\\\"" netname "\\\"") > 0 || in_subnet(line)) return 1
				n = split(line, f, " ")
				for (i = 1; i < n; i++) if ((f[i] == "-i" || f[i] == "-o") && f[i + 1] == bridge) return 1
				return 0
			}
			function target(line,   n, f, i) {
				n = split(line, f, " ")
				for (i = 1; i < n; i++) if (f[i] == "-j" || f[i] == "-g") return f[i + 1]
				return ""
			}
			function per_pod(chain) { return chain ~ /^CNI-/ && chain !~ /^CNI-HOSTPORT-/ }
			BEGIN {
				split(cidr, c, "/"); size = 2 ^ (32 - c[2]); base = int(num(c[1]) / size) * size
			}
			/^:CNI-HOSTPORT-/ { shared_chain[substr($1, 2)] = 1 }
			/^-A / {
				split($0, f, " "); chain = f[2]
				rules[n++] = $0; rule_chain[n - 1] = chain
				if (ours($0)) {
					marked[n - 1] = 1
					if (per_pod(chain)) mine[chain] = 1
					t = target($0); if (per_pod(t)) mine[t] = 1
				}
			}
			END {
				for (i = 0; i < n; i++) {
					if (rule_chain[i] in mine) continue
					if (marked[i] || (target(rules[i]) in mine)) drop[i] = 1
				}
				if (drop_shared && ("CNI-HOSTPORT-DNAT" in shared_chain)) {
					left = 0
					for (i = 0; i < n; i++) if (rule_chain[i] == "CNI-HOSTPORT-DNAT" && !(i in drop)) left++
					if (left == 0) {
						for (ch in shared_chain) mine[ch] = 1
						for (i = 0; i < n; i++) if (target(rules[i]) in shared_chain && !(rule_chain[i] in mine)) drop[i] = 1
					}
				}
				for (i = 0; i < n; i++) if (i in drop) out = out "-D " substr(rules[i], 4) "\n"
				for (ch in mine) out = out "-F " ch "\n"
				for (ch in mine) out = out "-X " ch "\n"
				if (out != "") printf "*%s\n%sCOMMIT\n", table, out
			}' <<<"$dump")
		[[ -z $script ]] && continue
		fsb_log "removing iptables ($table) rules of $netname ($subnet)"
		iptables-restore --noflush <<<"$script" ||
			fsb_log "warning: iptables-restore failed for table $table: $(tr '\n' ';' <<<"$script")"
	done
	return 0
}

# Mounts the cgroup v1 hugetlb hierarchy if this hybrid host lacks it: crun
# refuses "cgroups in hybrid mode" without it. Does not survive a reboot.
fsb_ensure_hugetlb_cgroup() {
	[[ -f /sys/fs/cgroup/cgroup.controllers ]] && return 0 # pure cgroup v2: nothing to do
	mountpoint -q /sys/fs/cgroup/hugetlb && return 0
	grep -qw hugetlb /proc/cgroups || return 0
	fsb_log "mounting the cgroup v1 hugetlb hierarchy at /sys/fs/cgroup/hugetlb"
	mkdir -p /sys/fs/cgroup/hugetlb
	# A concurrent caller may have won the race; that is fine.
	mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb || mountpoint -q /sys/fs/cgroup/hugetlb ||
		fsb_die "mount of the hugetlb cgroup hierarchy failed"
}

# Writes KEY=VALUE pairs as shell `export` lines to file $1 (atomically).
fsb_write_exports() {
	local file=$1 kv
	shift
	{
		printf '# Written by %s on %s. Source it: . %s\n' "${FSB_LOG_NAME:-$(basename "$0")}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$file"
		for kv in "$@"; do
			local value=${kv#*=}
			printf "export %s='%s'\n" "${kv%%=*}" "${value//\'/\'\\\'\'}"
		done
	} >"$file.tmp"
	mv -f "$file.tmp" "$file"
}
