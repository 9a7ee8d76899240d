#!/bin/sh
# Generates gen/clutchv1 (package clutchv1, import "clutch/gen/clutchv1")
# from proto/clutch/v1/messenger.proto. The output is ignored by git.
#
# Needs protoc-gen-go and protoc-gen-go-grpc on PATH (see README.md) and a
# protoc: $PROTOC, else `protoc` on PATH (Debian: protobuf-compiler), else
# the one the Rust build vendored (protoc-bin-vendored in ~/.cargo).
set -eu
cd "$(dirname "$0")"
if [ -z "${PROTOC:-}" ]; then
  PROTOC=$(command -v protoc || true)
fi
if [ -z "$PROTOC" ]; then
  case "$(uname -m)" in
    x86_64) arch=x86_64 ;;
    aarch64 | arm64) arch=aarch_64 ;;
    *) arch=$(uname -m) ;;
  esac
  PROTOC=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/protoc-bin-vendored-linux-"$arch"-*/bin/protoc 2>/dev/null | tail -n 1 || true)
fi
if [ -z "$PROTOC" ]; then
  echo "generate.sh: no protoc found: set PROTOC, install protobuf-compiler, or run cargo build once" >&2
  exit 1
fi
"$PROTOC" -I ../../proto \
  --go_out=. --go_opt=module=clutch \
  --go-grpc_out=. --go-grpc_opt=module=clutch \
  ../../proto/clutch/v1/messenger.proto
echo "generated gen/clutchv1 with $PROTOC"
