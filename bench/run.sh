#!/usr/bin/env bash
# make bench: requests/s and p50/p99 latency, on loopback, for
#   1. the upstream direct (nginx answering a constant JSON body),
#   2. the gateway (JWT on) forwarding to that nginx,
#   3. a bare Flask app under the same gunicorn settings (the ceiling of the stack),
# then the gateway/ceiling ratio. See bench/README.md.
#
# The gateway and the ceiling run side by side and are measured in alternation, BENCH_ROUNDS
# times (default 3); the report shows each one's median and the median of the per-round
# ratios, so a noisy neighbour on a shared machine skews one round, not the result.
#
# Env: BENCH_DURATION (default 10s) and BENCH_WARMUP (default 2s) per measured run;
#      BENCH_ROUNDS (3); BENCH_INSTANCES (1): upstream instances of the benched service (nginx
#      listens on that many ports, each registered);
#      BENCH_POLICY: a JSON policy PUT for the benched service first
#      (e.g. '{"rate_limit": "1000000/second", "request_headers": {"add": {"X-A": "1"}}}');
#      GATEWAY_WORKERS (2), GATEWAY_THREADS (16); any other GATEWAY_* (e.g. GATEWAY_STORE,
#      GATEWAY_RATE_LIMIT) flows through to the gateway process unchanged;
#      BENCH_ALLOW_ERRORS=1 to exit 0 even if a measured run saw non-2xx/3xx or socket errors;
#      BENCH_JWT: hs256 (default: the gateway's own secret) or rs256-jwks (an RS256 token whose
#      key the gateway fetches from a JWKS served on loopback by a tiny local server).
set -euo pipefail
export LC_ALL=C

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN="$ROOT/.venv/bin"

DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
INSTANCES=${BENCH_INSTANCES:-1}
WARMUP=${BENCH_WARMUP:-2s}
BENCH_JWT=${BENCH_JWT:-hs256}
case "$BENCH_JWT" in
  hs256|rs256-jwks) ;;
  *) printf 'bench: ERROR: BENCH_JWT must be hs256 or rs256-jwks, got %s\n' "$BENCH_JWT" >&2; exit 1 ;;
esac
CONNECTIONS=16
WRK_THREADS=2
WORKERS=${GATEWAY_WORKERS:-2}
THREADS=${GATEWAY_THREADS:-16}
BODY='{"message": "Hello from the Service!"}'

say() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: ERROR: %s\n' "$*" >&2; exit 1; }

# --- tools ----------------------------------------------------------------------------------
need_tools() {
  local missing=()
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]} with apt-get (running as root)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" \
      || die "apt-get install ${missing[*]} failed"
  else
    die "missing ${missing[*]}; install with: apt-get install wrk nginx-light curl"
  fi
}
need_tools
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$BIN/gunicorn" ] || die "$BIN/gunicorn not found; run 'make bench' (it installs the venv)"
[ -f "$ROOT/wsgi.py" ] || die "wsgi.py not found in $ROOT"
[ -f "$ROOT/gunicorn.conf.py" ] || die "gunicorn.conf.py not found in $ROOT"

# --- processes and cleanup ------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gateway-bench.XXXXXX")
PIDS=()

alive() {  # running and not a zombie
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

stop() {  # stop <pid> [signal]: signal the leader, wait up to 15 s, then SIGKILL its group
  local pid=$1 sig=${2:-TERM} i
  kill -"$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then say "pid $pid ignored SIG$sig for 15 s; killing"; fi
  kill -KILL -- "-$pid" 2>/dev/null || true  # the leader and anything it left (workers)
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM HUP
  if [ -n "${WRK_PID:-}" ]; then
    kill -TERM "$WRK_PID" 2>/dev/null || true
    wait "$WRK_PID" 2>/dev/null || true
  fi
  for pid in "${PIDS[@]}"; do stop "$pid"; done
  # Keep the server logs of the last run next to its results (bench/out/ is ignored by git).
  if [ -d "$ROOT/bench/out" ]; then
    rm -rf "$ROOT/bench/out/logs" && mkdir -p "$ROOT/bench/out/logs"
    cp "$TMP"/*.log "$TMP"/nginx/logs/*.log "$ROOT/bench/out/logs/" 2>/dev/null || true
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

spawn() {  # spawn <logfile> <cmd...>: run in its own process group, record the pid in LAST_PID
  local log=$1; shift
  setsid "$@" >"$log" 2>&1 </dev/null &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

forget() {  # forget <pid>: stop it now and drop it from the cleanup list
  local pid=$1 p keep=()
  stop "$pid"
  for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

show_log() { say "--- last lines of $1 ---"; tail -n 30 "$1" >&2 || true; }

wait_http() {  # wait_http <pid> <log> <url> <expect-substring>: poll up to 15 s
  local pid=$1 log=$2 url=$3 expect=$4 i out
  for ((i = 0; i < 75; i++)); do
    if ! alive "$pid"; then show_log "$log"; say "(the process exited)"; return 1; fi
    if out=$(curl -sf --max-time 1 "$url" 2>/dev/null) && [[ $out == *"$expect"* ]]; then
      return 0
    fi
    sleep 0.2
  done
  show_log "$log"
  return 1
}

read -r JWKS_PORT GW_PORT CEIL_PORT NGINX_PORT EXTRA_PORTS < <("$BIN/python" -c '
import socket, sys
ss = [socket.socket() for _ in range(3 + int(sys.argv[1]))]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
' "$INSTANCES")
read -r -a NGINX_PORTS <<<"$NGINX_PORT ${EXTRA_PORTS:-}"

# --- measuring ------------------------------------------------------------------------------
declare -A RPS P50 P99 ERR
ERRORS_SEEN=()

WRK_PID=""
run_wrk() {  # run_wrk <outfile> <wrk args...>: in the background, so a signal interrupts the wait
  local outfile=$1 rc=0; shift
  wrk -t"$WRK_THREADS" -c"$CONNECTIONS" --timeout 5s "$@" >"$outfile" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || rc=$?
  WRK_PID=""
  if [ "$rc" -ne 0 ]; then cat "$outfile" >&2; die "wrk exited with status $rc"; fi
}

measure() {  # measure <key> <url> [wrk args...]
  local key=$1 url=$2; shift 2
  local out line
  say "$key: warm-up $WARMUP, then $DURATION on $url"
  run_wrk "$TMP/wrk.out" -d"$WARMUP" "$@" "$url"
  run_wrk "$TMP/wrk.out" -d"$DURATION" --latency -s "$ROOT/bench/report.lua" "$@" "$url"
  out=$(cat "$TMP/wrk.out")
  printf '== %s %s\n%s\n' "$key" "$url" "$out" >>"$RAW"
  line=$(grep '^BENCH ' <<<"$out") || { printf '%s\n' "$out" >&2; die "no report from wrk"; }
  local rps p50 p99 ec er ew es et
  rps=$(sed -E 's/.* rps=([0-9.]+).*/\1/' <<<"$line")
  p50=$(sed -E 's/.* p50_us=([0-9]+).*/\1/' <<<"$line")
  p99=$(sed -E 's/.* p99_us=([0-9]+).*/\1/' <<<"$line")
  read -r ec er ew es et < <(sed -E \
    's/.*err_connect=([0-9]+) err_read=([0-9]+) err_write=([0-9]+) err_status=([0-9]+) err_timeout=([0-9]+).*/\1 \2 \3 \4 \5/' \
    <<<"$line")
  RPS[$key]=$rps P50[$key]=$p50 P99[$key]=$p99
  ERR[$key]=$((ec + er + ew + es + et))
  if [ "${ERR[$key]}" -ne 0 ]; then
    ERRORS_SEEN+=("$key: connect=$ec read=$er write=$ew status(non-2xx/3xx)=$es timeout=$et")
  fi
}

mkdir -p "$ROOT/bench/out"
RAW="$ROOT/bench/out/last-run.txt"
: >"$RAW"

# --- 1. upstream: nginx, constant JSON --------------------------------------------------------
NGX="$TMP/nginx"
mkdir -p "$NGX/logs"
cat >"$NGX/nginx.conf" <<EOF
worker_processes 1;
pid $NGX/nginx.pid;
error_log $NGX/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $NGX/client_body;
    proxy_temp_path $NGX/proxy;
    fastcgi_temp_path $NGX/fastcgi;
    uwsgi_temp_path $NGX/uwsgi;
    scgi_temp_path $NGX/scgi;
    server {
$(for port in "${NGINX_PORTS[@]}"; do echo "        listen 127.0.0.1:$port;"; done)
        default_type application/json;
        location / { return 200 '$BODY'; }
    }
}
EOF
spawn "$NGX/logs/stderr.log" "$NGINX" -p "$NGX" -c "$NGX/nginx.conf" -e "$NGX/logs/error.log" \
  -g 'daemon off;'
NGINX_PID=$LAST_PID
wait_http "$NGINX_PID" "$NGX/logs/error.log" "http://127.0.0.1:$NGINX_PORT/" "$BODY" \
  || die "nginx did not come up on 127.0.0.1:$NGINX_PORT"

# --- 2. the gateway ---------------------------------------------------------------------------
GW_DATA="$TMP/gateway-data"
CEIL_DATA="$TMP/ceiling-data"
mkdir -p "$GW_DATA" "$CEIL_DATA"
JWT_SECRET=$("$BIN/python" -c 'import secrets, string
a = string.ascii_letters + string.digits
print("".join(secrets.choice(a) for _ in range(48)))')
export GATEWAY_WORKERS="$WORKERS" GATEWAY_THREADS="$THREADS" GATEWAY_JWT_SECRET="$JWT_SECRET"
unset GATEWAY_JWT_SECRET_FILE  # the gateway refuses both; the bench mints with its own secret
STORE_DESC=${GATEWAY_STORE:-"default (SQLite in a temp data dir)"}
case "${GATEWAY_STORE:-}" in
  redis*)  # keys of this run under a prefix of its own, so runs never see each other's
    sep='?'; [[ $GATEWAY_STORE == *\?* ]] && sep='&'
    export GATEWAY_STORE="${GATEWAY_STORE}${sep}prefix=bench-$$-$RANDOM:" ;;
esac

# BENCH_JWT=rs256-jwks: an RSA key made now, its public half served as a JWKS by a tiny local
# server; the gateway fetches it at start (GATEWAY_JWT_JWKS_URL) and the bench signs with it.
GW_JWT_ENV=()
if [ "$BENCH_JWT" = rs256-jwks ]; then
  mkdir -p "$TMP/jwks"
  "$BIN/python" - "$TMP/jwks" <<'PY'
import json, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "bench", "alg": "RS256", "use": "sig"}
with open(f"{sys.argv[1]}/jwks.json", "w") as fh:
    json.dump({"keys": [jwk]}, fh)
with open(f"{sys.argv[1]}/../jwks-key.pem", "wb") as fh:
    fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
PY
  spawn "$TMP/jwks.log" "$BIN/python" -m http.server "$JWKS_PORT" --bind 127.0.0.1 \
    --directory "$TMP/jwks"
  JWKS_PID=$LAST_PID
  wait_http "$JWKS_PID" "$TMP/jwks.log" "http://127.0.0.1:$JWKS_PORT/jwks.json" '"kid": "bench"' \
    || die "the local JWKS server did not come up on 127.0.0.1:$JWKS_PORT"
  GW_JWT_ENV=(GATEWAY_JWT_JWKS_URL="http://127.0.0.1:$JWKS_PORT/jwks.json"
              GATEWAY_JWT_ALGORITHMS=RS256)
fi

GW_LOG="$TMP/gateway.log"
spawn "$GW_LOG" env GATEWAY_BIND="127.0.0.1:$GW_PORT" GATEWAY_DATA_DIR="$GW_DATA" \
  ${GW_JWT_ENV[@]+"${GW_JWT_ENV[@]}"} \
  "$BIN/gunicorn" -c gunicorn.conf.py --control-socket "$TMP/gateway.ctl" wsgi:app
GW_PID=$LAST_PID
wait_http "$GW_PID" "$GW_LOG" "http://127.0.0.1:$GW_PORT/_gateway/health" '"ok"' \
  || die "gateway did not answer GET /_gateway/health with 200 (waited up to 15 s)"
# The store the gateway says it opened (gunicorn.conf.py logs it), credentials masked, and
# whether its workers were given a CPU each.
if logged=$(grep 'gateway: listening' "$GW_LOG" | grep -o ' store [^ ,]*' | head -n 1) \
    && [ -n "$logged" ]; then
  STORE_DESC=${logged# store }
fi
STORE_DESC=$(sed -E 's#//[^/@]*@#//***@#' <<<"${STORE_DESC//"$TMP"/<tmp>}")
CPUS_DESC="scheduler"
if logged=$(grep -o 'one per CPU ([0-9,]*)' "$GW_LOG" | head -n 1) && [ -n "$logged" ]; then
  CPUS_DESC=$logged
fi

for port in "${NGINX_PORTS[@]}"; do
  code=$(curl -s -o "$TMP/register.out" -w '%{http_code}' --max-time 5 -X POST \
    --data "bench,http://127.0.0.1:$port" "http://127.0.0.1:$GW_PORT/register_service") || true
  if [ "$code" != 201 ]; then
    cat "$TMP/register.out" >&2 2>/dev/null || true
    show_log "$GW_LOG"
    die "POST /register_service answered HTTP $code, expected 201"
  fi
done

POLICY_DESC="none"
if [ -n "${BENCH_POLICY:-}" ]; then
  code=$(curl -s -o "$TMP/policy.out" -w '%{http_code}' --max-time 5 -X PUT \
    -H 'Content-Type: application/json' --data "$BENCH_POLICY" \
    "http://127.0.0.1:$GW_PORT/_gateway/services/bench/policy") || true
  case "$code" in
    200|201) POLICY_DESC=$BENCH_POLICY ;;
    *) cat "$TMP/policy.out" >&2 2>/dev/null || true; die "PUT policy answered HTTP $code" ;;
  esac
fi

TOKEN_SRC="gateway token"
TOKEN=""
if [ "$BENCH_JWT" = rs256-jwks ]; then
  TOKEN_SRC="RS256, kid 'bench', key from the JWKS at http://127.0.0.1:$JWKS_PORT/jwks.json"
  TOKEN=$("$BIN/python" -c 'import sys, time, jwt
key = open(sys.argv[1], "rb").read()
print(jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, key, algorithm="RS256",
                 headers={"kid": "bench"}))' "$TMP/jwks-key.pem")
elif [ -x "$BIN/gateway" ]; then
  TOKEN=$("$BIN/gateway" token --sub bench 2>"$TMP/token.err" | tail -n 1) || TOKEN=""
fi
if [ -z "$TOKEN" ]; then
  TOKEN_SRC="PyJWT fallback ($BIN/gateway token unavailable)"
  TOKEN=$("$BIN/python" -c 'import os, time, jwt
print(jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600},
                 os.environ["GATEWAY_JWT_SECRET"], algorithm="HS256"))')
fi

GW_URL="http://127.0.0.1:$GW_PORT/bench/"
# Each worker sees a new registration after its registry refresh, so allow a few seconds for
# 5 authenticated requests in a row (new connections, spread over the workers) to get through.
ok=0
for ((i = 0; i < 50 && ok < 5; i++)); do
  code=$(curl -s -o "$TMP/check.out" -w '%{http_code}' --max-time 5 \
    -H "Authorization: Bearer $TOKEN" "$GW_URL") || true
  if [ "$code" = 200 ] && [ "$(cat "$TMP/check.out")" = "$BODY" ]; then
    ok=$((ok + 1))
  else
    ok=0
    sleep 0.1
  fi
done
if [ "$ok" -lt 5 ]; then
  say "GET $GW_URL with the bench token: HTTP $code, body:"
  head -c 500 "$TMP/check.out" >&2 || true; echo >&2
  show_log "$GW_LOG"
  die "an authenticated request through the gateway did not return 200 and the nginx body"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$GW_URL") || true
case "$code" in
  401|403) JWT_DESC="on, $BENCH_JWT (HTTP $code without a token)" ;;
  *) JWT_DESC="NOT ENFORCED? (HTTP $code without a token)"
     say "warning: GET $GW_URL without a token answered HTTP $code" ;;
esac

# --- 3. ceiling: bare Flask app, same gunicorn settings ----------------------------------------
CEIL_URL="http://127.0.0.1:$CEIL_PORT/bench/"
CEIL_LOG="$TMP/ceiling.log"
CEIL_HOW="gunicorn -c gunicorn.conf.py bench.ceiling:app"
spawn "$CEIL_LOG" env GATEWAY_BIND="127.0.0.1:$CEIL_PORT" GATEWAY_DATA_DIR="$CEIL_DATA" \
  "$BIN/gunicorn" -c gunicorn.conf.py --control-socket "$TMP/ceiling.ctl" bench.ceiling:app
CEIL_PID=$LAST_PID
if ! wait_http "$CEIL_PID" "$CEIL_LOG" "$CEIL_URL" "$BODY"; then
  say "ceiling under gunicorn.conf.py did not come up; falling back to explicit gthread flags"
  forget "$CEIL_PID"
  CEIL_HOW="gunicorn -k gthread -w $WORKERS --threads $THREADS bench.ceiling:app (fallback)"
  CEIL_LOG="$TMP/ceiling-fallback.log"
  : >"$TMP/empty.conf.py"  # gunicorn would otherwise still read ./gunicorn.conf.py
  spawn "$CEIL_LOG" "$BIN/gunicorn" -c "$TMP/empty.conf.py" -k gthread -w "$WORKERS" \
    --threads "$THREADS" -b "127.0.0.1:$CEIL_PORT" --control-socket "$TMP/ceiling.ctl" \
    bench.ceiling:app
  CEIL_PID=$LAST_PID
  wait_http "$CEIL_PID" "$CEIL_LOG" "$CEIL_URL" "$BODY" || die "ceiling app did not come up"
fi

# --- measure: upstream once, then gateway and ceiling in alternation ---------------------------
echo "bench: config: workers=$WORKERS threads=$THREADS cpus=$CPUS_DESC store=$STORE_DESC jwt=$JWT_DESC" >&2
echo "bench: policy: $POLICY_DESC; upstream instances: $INSTANCES" >&2
echo "bench: token: $TOKEN_SRC" >&2
measure upstream "http://127.0.0.1:$NGINX_PORT/"
for ((round = 1; round <= ROUNDS; round++)); do
  measure "gateway$round" "$GW_URL" -H "Authorization: Bearer $TOKEN"
  measure "ceiling$round" "$CEIL_URL"
done
forget "$GW_PID"
forget "$CEIL_PID"

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
RATIOS=()
for key in gateway ceiling; do
  for stat in RPS P50 P99; do
    declare -n table=$stat
    table[$key]=$(for ((round = 1; round <= ROUNDS; round++)); do
      echo "${table[$key$round]}"; done | median)
    unset -n table
  done
  ERR[$key]=0
  for ((round = 1; round <= ROUNDS; round++)); do
    ERR[$key]=$((ERR[$key] + ERR[$key$round]))
  done
done
for ((round = 1; round <= ROUNDS; round++)); do
  RATIOS+=("$(awk -v g="${RPS[gateway$round]}" -v c="${RPS[ceiling$round]}" \
    'BEGIN { printf "%.1f", (c > 0 ? 100 * g / c : 0) }')")
done
RATIO=$(printf '%s\n' "${RATIOS[@]}" | median)

# --- report -----------------------------------------------------------------------------------
ms() { awk -v us="$1" 'BEGIN { printf "%.2f ms", us / 1000 }'; }
{
  echo
  echo "Gateway benchmark  $(date -u '+%Y-%m-%d %H:%M:%SZ')  $(nproc) cores, loopback"
  echo "  gateway: workers=$WORKERS threads=$THREADS cpus=$CPUS_DESC store=$STORE_DESC jwt=$JWT_DESC"
  echo "  ceiling: $CEIL_HOW"
  echo "  policy: $POLICY_DESC; upstream instances: $INSTANCES"
  echo "  wrk: $CONNECTIONS connections, $WRK_THREADS threads, $DURATION per run after a $WARMUP warm-up;"
  echo "       gateway and ceiling alternated over $ROUNDS rounds, medians shown"
  echo
  printf '%-28s %10s %11s %11s %7s\n' target 'req/s' p50 p99 errors
  for key in upstream gateway ceiling; do
    case $key in
      upstream) label="upstream (nginx direct)" ;;
      gateway) label="gateway (JWT, -> nginx)" ;;
      ceiling) label="ceiling (bare Flask)" ;;
    esac
    printf '%-28s %10.0f %11s %11s %7s\n' "$label" "${RPS[$key]}" "$(ms "${P50[$key]}")" \
      "$(ms "${P99[$key]}")" "${ERR[$key]}"
  done
  echo
  echo "gateway/ceiling: $RATIO% (median of the rounds: ${RATIOS[*]})"
} | tee -a "$RAW"

if [ ${#ERRORS_SEEN[@]} -ne 0 ]; then
  for e in "${ERRORS_SEEN[@]}"; do say "warning: errors during measured run: $e"; done
  if [ "${BENCH_ALLOW_ERRORS:-0}" != 1 ]; then
    die "measured runs had errors (numbers are not comparable); BENCH_ALLOW_ERRORS=1 to accept"
  fi
fi
