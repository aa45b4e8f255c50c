//! The CRI shim: serves CRI v1 on a unix socket and forwards to upstream.
