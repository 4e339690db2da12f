#!/bin/sh
# Rebuilds the SSH demo bundle from package-lock.json into a temporary
# directory and compares it with the committed tpproxy/web/static files.
# Exit 0: identical; 1: they differ (rebuild with ./build.sh and commit);
# 2: the build itself failed (npm or the registry unreachable, ...).
set -u
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! { npm ci --no-audit --no-fund --loglevel=error >"$tmp/npm.log" 2>&1 && node build.mjs "$tmp/out"; }; then
  cat "$tmp/npm.log" >&2
  echo "check.sh: the build failed" >&2
  exit 2
fi
status=0
for f in ssh-demo.js xterm.css THIRD-PARTY-LICENSES.txt; do
  if cmp -s "$tmp/out/$f" "../tpproxy/web/static/$f"; then
    echo "same: $f $(sha256sum <"$tmp/out/$f" | cut -d' ' -f1)"
  else
    echo "DIFFERENT: tpproxy/web/static/$f is not what web/build.sh makes" >&2
    status=1
  fi
done
recorded=$(grep -o 'sha256 [0-9a-f]*  ssh-demo.js' README.md | cut -d' ' -f2)
built=$(sha256sum <"$tmp/out/ssh-demo.js" | cut -d' ' -f1)
if [ "$recorded" != "$built" ]; then
  echo "DIFFERENT: web/README.md records sha256 $recorded for ssh-demo.js, the build makes $built" >&2
  status=1
fi
exit $status
