#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (metadata: [package.metadata.deb] in Cargo.toml)
# and prints the path of the .deb as the last line of its output. Installs cargo-deb first
# when it is missing. The release binary is built once, here.
#   packaging/build-deb.sh            # then: apt install ./target/debian/testflinger-agent_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."

# The version this packaging was written and checked with; an installed cargo-deb of
# another version is used as it is.
CARGO_DEB_VERSION="${CARGO_DEB_VERSION:-3.8.0}"

if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb $CARGO_DEB_VERSION" >&2
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked >&2
fi
echo "== $(cargo deb --version)" >&2

out=target/debian
mkdir -p "$out"
rm -f "$out"/testflinger-agent_*.deb
# cargo-deb prints the path of the package it wrote on stdout; its progress goes to stderr.
deb="$(cargo deb --locked --output "$out" | tail -n 1)"
if [ ! -f "$deb" ]; then
  echo "build-deb.sh: cargo deb did not report a package file (got: $deb)" >&2
  exit 1
fi
echo "$deb"
