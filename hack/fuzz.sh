#!/usr/bin/env bash
# Runs every `cargo fuzz` target in fuzz/ for a bounded time each, starting
# from the committed seed corpus (fuzz/corpus/<target>/) plus whatever an
# earlier run on this machine found (fuzz/target/work/corpus/<target>/, not
# committed). Prints the executions each target ran; exits non-zero if any
# target crashed (the input is kept in fuzz/artifacts/<target>/; replay it
# with `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a <target> <file>`).
#
# usage: hack/fuzz.sh [seconds per target, default 60]
#
# FAST_SANDBOX_FUZZ_TARGET_DIR: cargo target directory of the fuzz build
# (default fuzz/target).
#
# cargo-fuzz needs nightly flags; the stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1. No sanitizer (-s none): the code under test is safe
# Rust, and what is looked for is panics and broken invariants (asserted
# inside the targets), with overflow checks and debug assertions on (-a).
set -Eeuo pipefail

FSB_LOG_NAME=fuzz
# shellcheck source=hack/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FSB_REPO"

seconds=${1:-60}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || fsb_die "seconds must be a positive integer, got '$seconds'"
targets=(config claim rewrite preserve)

if ! command -v cargo-fuzz >/dev/null; then
	fsb_log "installing cargo-fuzz"
	cargo install cargo-fuzz --locked
fi
if ! command -v protoc >/dev/null; then
	# k8s-cri compiles the CRI protos at build time.
	fsb_require_root
	fsb_ensure_packages protobuf-compiler
fi

export RUSTC_BOOTSTRAP=1
fuzz_flags=(-s none -a)
if [[ -n ${FAST_SANDBOX_FUZZ_TARGET_DIR:-} ]]; then
	fuzz_flags+=(--target-dir "$FAST_SANDBOX_FUZZ_TARGET_DIR")
fi
fsb_log "building the fuzz targets"
cargo fuzz build "${fuzz_flags[@]}"

work=$FSB_REPO/fuzz/target/work
mkdir -p "$work"
failed=()
for target in "${targets[@]}"; do
	corpus=$work/corpus/$target
	seeds=$FSB_REPO/fuzz/corpus/$target
	log=$work/$target.log
	mkdir -p "$corpus" "$seeds"
	dict=()
	[[ -f fuzz/dict/$target.dict ]] && dict=("-dict=$FSB_REPO/fuzz/dict/$target.dict")
	fsb_log "fuzzing $target for ${seconds}s"
	rc=0
	# The first corpus directory receives new inputs; the seeds are read only.
	cargo fuzz run "${fuzz_flags[@]}" "$target" "$corpus" "$seeds" -- \
		-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
		-print_final_stats=1 "${dict[@]}" >"$log" 2>&1 || rc=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
	size=$(find "$corpus" -type f | wc -l)
	if ((rc != 0)); then
		failed+=("$target")
		tail -n 60 "$log" >&2
		fsb_log "$target: FAILED (exit $rc) after ${execs:-?} executions; full log $log"
	else
		fsb_log "$target: ${execs:-?} executions in ${seconds}s, no crash; corpus $size inputs"
	fi
done

if ((${#failed[@]} > 0)); then
	fsb_die "fuzz targets crashed: ${failed[*]} (inputs in fuzz/artifacts/)"
fi
fsb_log "all fuzz targets ran ${seconds}s each without a crash"
