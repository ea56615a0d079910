#!/usr/bin/env bash
# Installs the system tools the test suite runs for real (redis-server, prometheus and promtool)
# with apt-get, when they are missing and we are root. Without root or apt-get it installs
# nothing; the tests then skip locally and fail on CI (CI=true), where every tool is required.
set -uo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-tools: missing ${need[*]} (not root or no apt-get): those tests will skip" >&2
  exit 0
fi
echo "ensure-tools: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages start system-wide servers; the tests start their own on loopback ports.
if command -v service >/dev/null 2>&1; then
  service redis-server stop >/dev/null 2>&1 || true
  service prometheus stop >/dev/null 2>&1 || true
fi
exit 0
