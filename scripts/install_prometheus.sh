#!/usr/bin/env bash
# Put a real Prometheus server binary (Debian's package, unpacked, no service installed) under
# .cache/prometheus/ for the tests that scrape the plugin's /metrics with it. Idempotent.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$ROOT/.cache/prometheus"
BIN="$DEST/usr/bin/prometheus"
[ -x "$BIN" ] && exit 0
mkdir -p "$DEST/deb"
cd "$DEST/deb"
apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null; apt-get download prometheus >/dev/null; }
dpkg -x prometheus_*.deb "$DEST"
"$BIN" --version | head -1
