#!/bin/sh
# Rebuilds tpproxy/web/static/{ssh-demo.js,xterm.css}: see build.mjs.
# Usage: cd web && npm ci && ./build.sh [OUTDIR]
set -eu
cd "$(dirname "$0")"
exec node build.mjs "$@"
