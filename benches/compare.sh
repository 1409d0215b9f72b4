#!/usr/bin/env bash
# Side-by-side echo benchmark: Switchboard against two reference servers
# (benches/peers: tokio-tungstenite and fastwebsockets), one server at a
# time, each on one thread pinned to one core, the load generator pinned to
# another.
#
#   ROUNDS=3 DURATION=10 bash benches/compare.sh
#
# Environment (defaults in brackets):
#   ROUNDS [3]  DURATION [10] seconds measured per run
#   CONNS [100]  SIZE [32] payload bytes  DEPTH [8] messages in flight per connection
#   SERVER_CPU [0]  LOAD_CPU [1]   cores for taskset
#   BASE_PORT [9100]   switchboard BASE_PORT, tokio-tungstenite +1, fastwebsockets +2
#   SKIP_BUILD [0]     1: use the binaries already built
#   SETTLE [1] seconds of pause between runs
#
# Each round runs every server once; the order rotates from round to round
# so that no server always goes first (or last). The table shows, per
# server, the median over rounds of throughput and of server CPU time per
# echoed message, and Switchboard's ratios to each peer.
#
# Output: benches/results/compare-<timestamp>.jsonl, one line per run: the
# load generator's JSON line with "server_name", "round", "exit_status" and
# "loadavg" (from /proc/loadavg just before the run) added in front; and
# compare-<timestamp>.log with every run's readable report and server stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-100}
SIZE=${SIZE:-32}
DEPTH=${DEPTH:-8}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BASE_PORT=${BASE_PORT:-9100}
SKIP_BUILD=${SKIP_BUILD:-0}
SETTLE=${SETTLE:-1}

SB_BIN=./target/release/switchboard
LOAD_BIN=./target/release/switchboard-load
PEERS_DIR=./benches/peers/target/release

SERVERS=(switchboard tokio-tungstenite fastwebsockets)

die() { echo "compare.sh: $*" >&2; exit 2; }

for tool in taskset python3 cargo; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
if (( $(nproc --all) <= (SERVER_CPU > LOAD_CPU ? SERVER_CPU : LOAD_CPU) )); then
    die "need cores $SERVER_CPU and $LOAD_CPU; this machine has $(nproc --all)"
fi

if [[ $SKIP_BUILD != 1 ]]; then
    echo "== building switchboard (cargo build --release --bins)"
    cargo build --release --bins
    echo "== building the peers (benches/peers)"
    cargo build --release --manifest-path benches/peers/Cargo.toml
fi
for bin in "$SB_BIN" "$LOAD_BIN" "$PEERS_DIR/peer-tokio-tungstenite" "$PEERS_DIR/peer-fastwebsockets"; do
    [[ -x $bin ]] || die "$bin is missing (build it, or unset SKIP_BUILD)"
done

mkdir -p benches/results
STAMP=$(date +%Y%m%d-%H%M%S)
JSONL=benches/results/compare-$STAMP.jsonl
LOG=benches/results/compare-$STAMP.log
: >"$JSONL"
: >"$LOG"

port_of() {
    case $1 in
        switchboard) echo $((BASE_PORT)) ;;
        tokio-tungstenite) echo $((BASE_PORT + 1)) ;;
        fastwebsockets) echo $((BASE_PORT + 2)) ;;
    esac
}

SERVER_PID=
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "   (pid $SERVER_PID ignored SIGTERM for 5 s: SIGKILL)" | tee -a "$LOG"
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

# Start one server pinned to SERVER_CPU; taskset execs it, so $! is the server.
start_server() {
    local name=$1 port=$2 errfile=$3
    case $name in
        switchboard)
            # Its store (channel history is persisted) in a fresh directory.
            SWITCHBOARD_STORAGE_DATA_DIR="$(mktemp -d)" \
                taskset -c "$SERVER_CPU" "$SB_BIN" serve --port "$port" --shards 1 --log-level warn 2>"$errfile" &
            ;;
        tokio-tungstenite)
            taskset -c "$SERVER_CPU" "$PEERS_DIR/peer-tokio-tungstenite" --port "$port" 2>"$errfile" &
            ;;
        fastwebsockets)
            taskset -c "$SERVER_CPU" "$PEERS_DIR/peer-fastwebsockets" --port "$port" 2>"$errfile" &
            ;;
    esac
    SERVER_PID=$!
}

# Wait until 127.0.0.1:port accepts a TCP connection (10 s at most).
wait_for_port() {
    local port=$1
    for _ in $(seq 200); do
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

run_one() {
    local name=$1 round=$2
    local port errfile out rc json loadavg
    port=$(port_of "$name")
    errfile=$(mktemp)
    out=$(mktemp)
    start_server "$name" "$port" "$errfile"
    if ! wait_for_port "$port"; then
        echo "   $name did not start listening on port $port" | tee -a "$LOG"
        cat "$errfile" | tee -a "$LOG"
        stop_server
        rm -f "$errfile" "$out"
        return 0
    fi
    local affinity
    affinity=$(taskset -pc "$SERVER_PID" 2>/dev/null | sed 's/.*: //')
    loadavg=$(cut -d' ' -f1-3 /proc/loadavg)
    printf '   round %d  %-18s pid %-7s cpus %-3s load %s ... ' "$round" "$name" "$SERVER_PID" "$affinity" "$loadavg"
    rc=0
    taskset -c "$LOAD_CPU" timeout -k 5 $((DURATION + 60)) "$LOAD_BIN" echo \
        --url "ws://127.0.0.1:$port/echo" -c "$CONNS" -s "$SIZE" -d "$DEPTH" -t "$DURATION" \
        --pid "$SERVER_PID" --json >"$out" 2>&1 || rc=$?
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "   $name (pid $SERVER_PID) exited during the run" >>"$LOG"
    fi
    stop_server
    {
        echo "---- round $round: $name (port $port, load generator exit $rc, loadavg $loadavg)"
        grep -v '^{' "$out" || true
        if [[ -s $errfile ]]; then
            echo "  server stderr:"
            sed 's/^/    /' "$errfile"
        fi
    } >>"$LOG"
    json=$(grep '^{' "$out" | tail -n 1 || true)
    if [[ -z $json ]]; then
        echo "no JSON line (exit $rc); see $LOG"
    else
        SERVER=$name ROUND=$round RC=$rc LOADAVG=$loadavg python3 -c '
import json, os, sys
raw = json.loads(sys.argv[1])
line = {"server_name": os.environ["SERVER"], "round": int(os.environ["ROUND"]),
        "exit_status": int(os.environ["RC"]), "loadavg": os.environ["LOADAVG"]}
line.update(raw)
print(json.dumps(line))' "$json" >>"$JSONL"
        python3 -c '
import json, sys
r = json.loads(sys.argv[1])
s = r.get("server") or {}
mps = r.get("msgs_per_sec") or 0
us = s.get("cpu_us_per_msg")
cores = s.get("cpu_cores") or 0
errs = (r.get("errors") or {}).get("total", "?")
us = "-" if us is None else format(us, ".3f")
print(f"{mps:>10,.0f} msg/s  {us:>6} us/msg  server {cores:.2f} cores  errors {errs}")' "$json"
    fi
    local noise
    noise=$(grep -cv 'listening on' "$errfile" || true)
    if ((noise > 0)); then
        echo "   ($name wrote $noise line(s) to stderr; see $LOG)"
    fi
    rm -f "$errfile" "$out"
}

echo "== machine: $(nproc --all) cores; uptime:$(uptime | sed 's/.*up/ up/')"
echo "== echo: $CONNS connections, $SIZE B text, $DEPTH in flight, ${DURATION}s x $ROUNDS rounds;" \
    "servers on cpu $SERVER_CPU, load generator on cpu $LOAD_CPU"
{
    echo "compare.sh $STAMP  rounds $ROUNDS duration $DURATION conns $CONNS size $SIZE depth $DEPTH"
    echo "uptime: $(uptime)"
    echo "switchboard: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (+ uncommitted changes)')"
} >>"$LOG"

n=${#SERVERS[@]}
for ((round = 1; round <= ROUNDS; round++)); do
    for ((i = 0; i < n; i++)); do
        name=${SERVERS[$(((i + round - 1) % n))]}
        run_one "$name" "$round"
        sleep "$SETTLE"
    done
done

echo "== uptime after:$(uptime | sed 's/.*up/ up/')"
echo "uptime after: $(uptime)" >>"$LOG"

python3 - "$JSONL" <<'EOF'
import json, statistics, sys

servers = ["switchboard", "tokio-tungstenite", "fastwebsockets"]
runs = {s: [] for s in servers}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["server_name"], []).append(r)

def med(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None

def fmt(x, spec):
    return format(x, spec) if x is not None else "-"

rows = {}
for s in servers:
    rs = runs.get(s, [])
    rows[s] = {
        "n": len(rs),
        "mps": med([r.get("msgs_per_sec") for r in rs]),
        "us": med([(r.get("server") or {}).get("cpu_us_per_msg") for r in rs]),
        "cores": med([(r.get("server") or {}).get("cpu_cores") for r in rs]),
        "p99": med([(r.get("latency_us") or {}).get("p99") for r in rs]),
        "errors": sum(((r.get("errors") or {}).get("total") or 0) for r in rs),
        "bad_exit": sum(1 for r in rs if r.get("exit_status")),
        "all_mps": [r.get("msgs_per_sec") for r in rs],
        "all_us": [(r.get("server") or {}).get("cpu_us_per_msg") for r in rs],
    }

print()
print("median over rounds (server on 1 core; lower us/msg is better)")
print(f"{'server':<20}{'runs':>5}{'msgs/s':>12}{'server us/msg':>15}{'server cores':>14}{'p99 us':>9}{'errors':>8}")
for s in servers:
    r = rows[s]
    print(f"{s:<20}{r['n']:>5}{fmt(r['mps'], ',.0f'):>12}{fmt(r['us'], '.3f'):>15}"
          f"{fmt(r['cores'], '.2f'):>14}{fmt(r['p99'], '.0f'):>9}{r['errors']:>8}")
print()
print("per round:")
for s in servers:
    r = rows[s]
    print(f"  {s:<18} msgs/s {', '.join(fmt(x, ',.0f') for x in r['all_mps'])}   "
          f"us/msg {', '.join(fmt(x, '.3f') for x in r['all_us'])}")
print()
sb = rows["switchboard"]
for peer in servers[1:]:
    p = rows[peer]
    cpu = sb["us"] / p["us"] if sb["us"] and p["us"] else None
    thr = sb["mps"] / p["mps"] if sb["mps"] and p["mps"] else None
    print(f"switchboard / {peer:<18} server CPU per message {fmt(cpu, '.2f')}   throughput {fmt(thr, '.2f')}")
bad = {s: rows[s]["bad_exit"] for s in servers if rows[s]["bad_exit"]}
if bad:
    print(f"\nruns where the load generator reported errors (exit status != 0): {bad}")
EOF
echo
echo "raw results: $JSONL"
echo "run reports and server stderr: $LOG"
