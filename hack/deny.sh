#!/usr/bin/env bash
# cargo deny over the workspace: licences, duplicate versions, sources and
# RustSec advisories. The advisories are never skipped: from the live
# database on GitHub when it is reachable, else from a snapshot of it
# (a tarball of the advisory-db repository's files), whose date is printed.
#
# usage: deny.sh
#
# Settings (environment):
#   FAST_SANDBOX_ADVISORY_SNAPSHOT  the snapshot tarball, default
#         ../shared/advisory-db.tar.gz beside the repository
#   FAST_SANDBOX_ADVISORY_LIVE=0    use the snapshot even when GitHub answers
set -Eeuo pipefail

FSB_LOG_NAME=deny
# shellcheck source=hack/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SNAPSHOT=$(realpath -m -- "${FAST_SANDBOX_ADVISORY_SNAPSHOT:-$FSB_REPO/../shared/advisory-db.tar.gz}")
URL=https://github.com/rustsec/advisory-db
# Where cargo-deny looks for the database of $URL under its db-path (the
# last path segment and a hash of the URL; cargo-deny names it in its error
# when it differs, and this script then uses that name).
DB_DIR_NAME=advisory-db-3157b0e258782691

command -v cargo-deny >/dev/null || cargo install cargo-deny --locked
cd "$FSB_REPO"

if [[ ${FAST_SANDBOX_ADVISORY_LIVE:-1} == 0 ]]; then
	why="not used (FAST_SANDBOX_ADVISORY_LIVE=0)"
elif timeout 30 git ls-remote "$URL" HEAD >/dev/null 2>&1; then
	fsb_log "advisories from the live RustSec database ($URL)"
	exec cargo deny --locked check
else
	why="unreachable"
fi

[[ -f $SNAPSHOT ]] ||
	fsb_die "$URL is $why and there is no advisory snapshot at $SNAPSHOT: advisories cannot be checked (set FAST_SANDBOX_ADVISORY_SNAPSHOT)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# cargo-deny reads a database offline only from a git repository (it takes
# the HEAD commit's date as the database's age): the snapshot's files become
# one commit dated like its newest file.
unpack() {
	local dir=$1 date
	rm -rf "$dir"
	mkdir -p "$dir"
	tar -xzf "$SNAPSHOT" -C "$dir" --strip-components=1
	date=$(find "$dir" -type f -printf '%TY-%Tm-%TdT%TH:%TM:%.2TSZ\n' | sort | tail -n1)
	[[ -n $date && -d $dir/crates ]] || fsb_die "$SNAPSHOT holds no advisory-db (no crates/ directory)"
	git -C "$dir" init -q
	git -C "$dir" add -A
	GIT_AUTHOR_DATE=$date GIT_COMMITTER_DATE=$date git -C "$dir" \
		-c user.name=snapshot -c user.email=snapshot@localhost commit -qm "advisory-db snapshot"
	fsb_log "$URL is $why: advisories from the snapshot $SNAPSHOT, dated $date ($(find "$dir/crates" -name '*.md' | wc -l) advisories)"
}

sed "/^\[advisories\]/a db-path = \"$work/db\"" deny.toml >"$work/deny.toml"
unpack "$work/db/$DB_DIR_NAME"
if ! out=$(cargo deny --locked --offline --config "$work/deny.toml" check 2>&1); then
	expected=$(sed -n "s|.*cannot change to '$work/db/\([^']*\)'.*|\1|p" <<<"$out" | head -n1)
	if [[ -n $expected && $expected != "$DB_DIR_NAME" ]]; then
		fsb_log "this cargo-deny names the database directory $expected"
		unpack "$work/db/$expected"
		cargo deny --locked --offline --config "$work/deny.toml" check
		exit
	fi
	printf '%s\n' "$out" >&2
	exit 1
fi
printf '%s\n' "$out" >&2
