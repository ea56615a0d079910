#!/usr/bin/env bash
# Deploys the AI streaming gateway on this host under PM2 (ecosystem.config.js): installs or
# updates the venv, `pm2 startOrReload`, then health-checks the admin page (ADMIN_PORT, 3300) and
# the API (PORT, 3301: liveness, then readiness) with bounded retries. Must match the app:
# PORT / ADMIN_PORT as in the env file, ecosystem.config.js and the proxies' upstreams.
#
#   deploy/deploy.sh [all|install|reload|check]     (default: all)
#
# Settings: ENV_FILE (default /etc/ai-stream-gateway.env, loaded when present: OPENAI_API_KEY,
# PORT, ...), HEALTH_HOST (127.0.0.1), HEALTH_RETRIES (30), HEALTH_DELAY_S (1).
# Exit status: 0 deployed and healthy; 1 a health check failed (named on stderr); 2 usage.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV_FILE="${ENV_FILE:-/etc/ai-stream-gateway.env}"
if [ -f "$ENV_FILE" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  set +a
fi
PORT="${PORT:-3301}"
ADMIN_PORT="${ADMIN_PORT:-3300}"
HEALTH_HOST="${HEALTH_HOST:-127.0.0.1}"
HEALTH_RETRIES="${HEALTH_RETRIES:-30}"
HEALTH_DELAY_S="${HEALTH_DELAY_S:-1}"

say() { echo "deploy: $*" >&2; }

install() {
  say "installing into $ROOT/.venv"
  [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
  "$ROOT/.venv/bin/python" -m pip install --quiet "$ROOT"
}

reload() {
  say "pm2 startOrReload"
  (cd "$ROOT" && pm2 startOrReload ecosystem.config.js --update-env && pm2 save)
}

# check NAME URL: GET URL until it answers 200, at most HEALTH_RETRIES times.
check() {
  local name="$1" url="$2" try=1 answer=""
  while :; do
    if answer="$(curl -fsS --max-time 2 "$url" 2>&1)"; then
      say "ok: $name $url"
      return 0
    fi
    if [ "$try" -ge "$HEALTH_RETRIES" ]; then
      say "FAILED: $name: GET $url after $try tries: ${answer:-no answer}"
      return 1
    fi
    try=$((try + 1))
    sleep "$HEALTH_DELAY_S"
  done
}

checks() {
  local failed=()
  check admin "http://$HEALTH_HOST:$ADMIN_PORT/health" || failed+=(admin)
  check api "http://$HEALTH_HOST:$PORT/health" || failed+=(api)
  if [[ ! " ${failed[*]} " =~ " api " ]]; then
    check api-ready "http://$HEALTH_HOST:$PORT/health/ready" || failed+=(api-ready)
  fi
  if [ "${#failed[@]}" -gt 0 ]; then
    say "health checks failed: ${failed[*]}"
    return 1
  fi
  say "healthy: admin on $ADMIN_PORT, api on $PORT"
}

case "${1:-all}" in
  all) install; reload; checks ;;
  install) install ;;
  reload) reload ;;
  check) checks ;;
  *) say "usage: deploy/deploy.sh [all|install|reload|check]"; exit 2 ;;
esac
