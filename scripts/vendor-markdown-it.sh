#!/usr/bin/env bash
# Vendors markdown-it's browser ES module build for the admin page, with the licences of what the
# build bundles. Usage: scripts/vendor-markdown-it.sh 15.0.3 (then run the admin tests).
set -euo pipefail
version="${1:?usage: $0 VERSION}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/service/admin/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "markdown-it@$version" >/dev/null
mkdir md && tar xzf markdown-it-*.tgz -C md
# the bundled dependencies, at the ranges this markdown-it version asks for
deps="entities linkify-it mdurl punycode.js uc.micro"
{
  echo "markdown-it $version (https://github.com/markdown-it/markdown-it)"
  echo
  cat md/package/LICENSE
  for dep in $deps; do
    range="$(node -p "require('./md/package/package.json').dependencies['$dep']")"
    tarball="$(npm pack --silent "$dep@$range" | tail -1)"
    mkdir "$dep" && tar xzf "$tarball" -C "$dep"
    echo
    echo "----------------------------------------------------------------------"
    echo "Bundled in the build above: ${tarball%.tgz}"
    echo
    cat "$dep"/package/LICENSE*
  done
} >"$dest/markdown-it.LICENSE"
cp md/package/dist/browser/markdown-it.esm.min.mjs "$dest/markdown-it.min.mjs"
sha256sum "$dest/markdown-it.min.mjs"
