#!/usr/bin/env bash
# Toolchains of the real-client tests (tests/tests/real_clients.rs): a Go CRI
# client built offline from Debian's Go packages, and a Python client on
# PyPI's grpcio.
#
# usage: hack/clients.sh [DIR]      (DIR default: $FAST_SANDBOX_DEV_DIR/clients)
#
#   - installs the Debian packages that are missing: golang-go (1.19),
#     golang-google-grpc-dev (grpc-go 1.33), golang-github-golang-protobuf-1-5-dev
#     and golang-google-protobuf-dev (the protobuf runtime grpc-go 1.33 needs:
#     the 1.3 API that apt may pick otherwise cannot decode APIv2 stubs),
#     protoc-gen-go, protoc-gen-go-grpc, protobuf-compiler, python3-venv;
#   - creates DIR/venv with Debian's python3 and installs grpcio and
#     grpcio-tools (pinned below) from PyPI with pip;
#   - writes DIR/env: FAST_SANDBOX_CLIENTS_PYTHON (the venv's interpreter)
#     and FAST_SANDBOX_CLIENTS_GOCACHE (a Go build cache kept between runs).
#
# Idempotent: a second run installs nothing new. The Go client itself is
# built by the test, with GO111MODULE=off and GOPROXY=off (no network).
set -Eeuo pipefail

FSB_LOG_NAME=clients
# shellcheck source=hack/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
fsb_become_root "$@"

DIR=$(realpath -m -- "${1:-${FAST_SANDBOX_DEV_DIR:-/var/lib/fast-sandbox-dev}/clients}")
VENV=$DIR/venv
# grpcio >= 1.57 sends the socket path as :authority (issue 10); pinned so a
# CI run does not change clients under the tests.
GRPCIO_VERSION=1.85.4

fsb_ensure_packages golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev \
	golang-google-protobuf-dev protoc-gen-go protoc-gen-go-grpc protobuf-compiler python3-venv

mkdir -p "$DIR/gocache"
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c "import grpc, grpc_tools; assert grpc.__version__ == '$GRPCIO_VERSION'" 2>/dev/null; then
	fsb_log "creating $VENV with grpcio $GRPCIO_VERSION (PyPI)"
	# Debian's interpreter, not whatever python3 comes first on PATH.
	/usr/bin/python3 -m venv --clear "$VENV"
	"$VENV/bin/pip" install --quiet --disable-pip-version-check \
		"grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_VERSION" >&2 ||
		fsb_die "pip install of grpcio/grpcio-tools failed"
fi
"$VENV/bin/python" -c "import grpc, grpc_tools" || fsb_die "the venv at $VENV cannot import grpc"

fsb_write_exports "$DIR/env" \
	"FAST_SANDBOX_CLIENTS_PYTHON=$VENV/bin/python" \
	"FAST_SANDBOX_CLIENTS_GOCACHE=$DIR/gocache"
fsb_log "ready: . $DIR/env (go $(go env GOVERSION), grpcio $("$VENV/bin/python" -c 'import grpc; print(grpc.__version__)'))"
