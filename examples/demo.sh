#!/usr/bin/env bash
# The seed's story end to end: gateway up, hello_service registers itself, the client calls
# it with and without a JWT, the service leaves and the gateway answers 404 for it.
# Run from the repo root as `bash examples/demo.sh` (that is what `make demo` does).
# Everything started here is stopped on exit; exits non-zero if any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
GATEWAY_PORT=8080
HELLO_PORT=9090
GATEWAY=http://127.0.0.1:$GATEWAY_PORT
WAIT_S=15
# Each gateway worker refreshes its registry snapshot every 0.25 s, so a change can be visible
# through one worker before another: registry changes must be seen this many polls running
# (0.2 s apart) before the next step relies on them.
STEADY_POLLS=6

# The seed's secret and issuer. The secret is short: the gateway warns about it at start.
export GATEWAY_JWT_SECRET=secret_key
export GATEWAY_JWT_ISSUER=my_issuer
export GATEWAY_URL=$GATEWAY

WORK=$(mktemp -d)
DATA_DIR=$WORK/data
mkdir "$DATA_DIR"
gateway_pid=""
hello_pid=""
step_no=0

step() { step_no=$((step_no + 1)); echo; echo "==> [$step_no] $*"; }
fail() { echo "demo: FAILED: $*" >&2; exit 1; }

show_log() {  # show_log NAME: the whole log of a process started here
  [[ -s $WORK/$1.log ]] || return 0
  echo "--- $1 log ---"
  sed 's/^/    /' "$WORK/$1.log"
}

hello_seen=0
hello_news() {  # print the hello_service log lines not shown yet
  local n
  n=$(wc -l <"$WORK/hello_service.log")
  if ((n > hello_seen)); then
    sed -n "$((hello_seen + 1)),${n}p" "$WORK/hello_service.log" | sed 's/^/    /'
  fi
  hello_seen=$n
}

stop() {  # stop PID with SIGTERM and wait for it; returns its exit status
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  local rc=0
  wait "$pid" || rc=$?
  return "$rc"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # The service first, so it can still deregister; then the gateway.
  if [[ -n $hello_pid ]]; then stop "$hello_pid" || true; fi
  if [[ -n $gateway_pid ]]; then stop "$gateway_pid" || true; fi
  echo
  show_log gateway  # includes the expected warning about the seed's short secret
  ((rc == 0)) || show_log hello_service
  rm -rf "$WORK"
  if ((rc == 0)); then echo "demo: OK"; else echo "demo: FAILED (exit $rc)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_free() {  # can we bind 127.0.0.1:PORT (as the servers will, with SO_REUSEADDR)?
  "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

http_code() {  # print the HTTP status of GET URL (000 if nothing answered)
  curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true
}

wait_for() {  # wait_for URL STATUS PID WHAT [TIMES]: until URL answers STATUS TIMES running
  local url=$1 want=$2 pid=$3 what=$4 times=${5:-1} seen=0 code
  local deadline=$((SECONDS + WAIT_S))
  while true; do  # PID must stay up meanwhile
    code=$(http_code "$url")
    if [[ $code == "$want" ]]; then
      seen=$((seen + 1))
      ((seen < times)) || return 0
    else
      seen=0
    fi
    kill -0 "$pid" 2>/dev/null || fail "$what: process exited before $url answered $want"
    ((SECONDS < deadline)) || fail "$what: $url answered $code, not $want, within ${WAIT_S}s"
    sleep 0.2
  done
}

step "Check prerequisites and that ports $GATEWAY_PORT and $HELLO_PORT are free"
[[ -x .venv/bin/gunicorn && -x $PY ]] || fail "no .venv with gunicorn; run this as 'make demo', which installs it"
[[ -f wsgi.py && -f gunicorn.conf.py ]] || fail "wsgi.py or gunicorn.conf.py missing"
for port in "$GATEWAY_PORT" "$HELLO_PORT"; do
  port_free "$port" || fail "port $port on 127.0.0.1 is already in use; stop whatever holds it"
done
echo "ok"

step "Start the gateway on 127.0.0.1:$GATEWAY_PORT (data dir $DATA_DIR)"
# --no-control-socket: gunicorn's default control socket (~/.gunicorn/gunicorn.ctl) is one path
# for every gunicorn of the user; a demo must not take it over from (or hand it to) another.
GATEWAY_BIND=127.0.0.1:$GATEWAY_PORT GATEWAY_DATA_DIR=$DATA_DIR \
  .venv/bin/gunicorn -c gunicorn.conf.py --no-control-socket wsgi:app >"$WORK/gateway.log" 2>&1 &
gateway_pid=$!
wait_for "$GATEWAY/_gateway/health" 200 "$gateway_pid" "gateway"
echo "GET /_gateway/health: $(curl -s "$GATEWAY/_gateway/health")"

step "Start hello_service on 127.0.0.1:$HELLO_PORT; it registers itself with the gateway"
"$PY" examples/hello_service.py --port "$HELLO_PORT" >"$WORK/hello_service.log" 2>&1 &
hello_pid=$!
wait_for "$GATEWAY/_gateway/services/hello_service" 200 "$hello_pid" "hello_service" \
  "$STEADY_POLLS"
hello_news
echo "GET /_gateway/services/hello_service: $(curl -s "$GATEWAY/_gateway/services/hello_service")"

step "Run the client: call /hello_service with a JWT, then without one"
"$PY" examples/client.py || fail "client.py: expected 200 with the token and 401 without"
echo "hello_service saw:"
hello_news

step "The registry: curl -s $GATEWAY/_gateway/services"
services=$(curl -sS --fail-with-body "$GATEWAY/_gateway/services") || fail "could not list services"
echo "$services"

step "Stop hello_service (SIGTERM): it deregisters itself"
stop "$hello_pid" || fail "hello_service exited with status $?"
hello_pid=""
hello_news
wait_for "$GATEWAY/_gateway/services/hello_service" 404 "$gateway_pid" "deregistration" \
  "$STEADY_POLLS"
echo "GET /_gateway/services/hello_service: $(curl -s "$GATEWAY/_gateway/services/hello_service")"

step "Call /hello_service again with a valid token: the gateway has no such service now"
token=$("$PY" examples/client.py --print-token)
out=$(curl -sS --max-time 5 -w '\n%{http_code}' -H "Authorization: $token" "$GATEWAY/hello_service")
code=${out##*$'\n'}
body=${out%$'\n'*}
echo "Response: $code"
echo "Response Body: ${body%$'\n'}"
[[ $code == 404 ]] || fail "expected 404 for a deregistered service, got $code"
