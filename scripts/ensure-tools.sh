#!/usr/bin/env bash
# Installs the system tools the test suite runs for real, when they are missing and we are root:
# redis-server, prometheus and promtool, nginx, caddy, chromium, and iproute2 and nftables (the
# network namespaces of the vanished-peer tests) with apt-get, and PM2 with npm.
# Without root (or apt-get / npm) it installs nothing; those tests then skip locally and fail on
# CI (CI=true), where every tool is required. Daemons the packages would start are kept stopped:
# the tests start their own on loopback ports.
set -uo pipefail

PM2_VERSION=7.0.4

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v caddy >/dev/null 2>&1 || need+=(caddy)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
need_pm2=0
command -v pm2-runtime >/dev/null 2>&1 || need_pm2=1

if [ ${#need[@]} -eq 0 ] && [ $need_pm2 -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-tools: missing ${need[*]} $([ $need_pm2 -eq 1 ] && echo pm2) (not root): those tests will skip" >&2
  exit 0
fi

if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "ensure-tools: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' own daemons from starting (nginx and caddy would take port 80).
    policy=/usr/sbin/policy-rc.d
    had_policy=0
    [ -e "$policy" ] && had_policy=1
    [ $had_policy -eq 0 ] && printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ $had_policy -eq 0 ] && rm -f "$policy"
    if command -v service >/dev/null 2>&1; then
      for daemon in redis-server prometheus nginx caddy; do
        service "$daemon" stop >/dev/null 2>&1 || true
      done
    fi
  else
    echo "ensure-tools: missing ${need[*]} (no apt-get): those tests will skip" >&2
  fi
fi

if [ $need_pm2 -eq 1 ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "ensure-tools: installing pm2@${PM2_VERSION}" >&2
    npm install --global --silent --no-fund --no-audit "pm2@${PM2_VERSION}" >/dev/null
  else
    echo "ensure-tools: missing pm2 (no npm): those tests will skip" >&2
  fi
fi
exit 0
