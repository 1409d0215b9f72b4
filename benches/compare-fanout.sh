#!/usr/bin/env bash
# Side-by-side fan-out benchmark through the JSON protocol (/ws):
# Switchboard against two reference servers (benches/peers:
# tokio-tungstenite and fastwebsockets, each with a /ws route speaking the
# subset of the protocol `switchboard-load fanout` uses), one server at a
# time, each on one thread pinned to one core, the load generator pinned to
# another.
#
#   ROUNDS=2 N=10000 DURATION=10 bash benches/compare-fanout.sh
#
# Environment (defaults in brackets):
#   ROUNDS [2]  DURATION [10] seconds measured per run
#   N [10000] subscribers  K [4] publishes in flight  SIZE [64] data bytes
#   RAMP [5000] subscriber connections per second during setup
#   SERVER_CPU [0]  LOAD_CPU [1]   cores for taskset
#   BASE_PORT [9100]   switchboard BASE_PORT, tokio-tungstenite +1, fastwebsockets +2
#                      (+3, +6, ... while the port still has sockets: see pick_port)
#   SKIP_BUILD [0]     1: use the binaries already built
#   SETTLE [2] seconds of pause between runs
#
# Each round runs every server once; the order rotates from round to round
# so that no server always goes first (or last). Switchboard runs with one
# shard (`serve --shards 1`). The table shows, per server, the median over
# rounds of deliveries per second, server CPU time per delivery and delivery
# latency, and Switchboard's ratios to each peer (server CPU per delivery:
# lower is better).
#
# Output: benches/results/compare-fanout-<timestamp>.jsonl, one line per
# run: the load generator's JSON line with "server_name", "round",
# "exit_status" and "loadavg" (from /proc/loadavg just before the run) added
# in front, and "server_core_other_pct" (the share of the server's core
# that other work took during the run); and compare-fanout-<timestamp>.log with every run's readable
# report and server stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10}
N=${N:-10000}
K=${K:-4}
SIZE=${SIZE:-64}
RAMP=${RAMP:-5000}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BASE_PORT=${BASE_PORT:-9100}
SKIP_BUILD=${SKIP_BUILD:-0}
SETTLE=${SETTLE:-2}

SB_BIN=./target/release/switchboard
LOAD_BIN=./target/release/switchboard-load
PEERS_DIR=./benches/peers/target/release

SERVERS=(switchboard tokio-tungstenite fastwebsockets)

die() { echo "compare-fanout.sh: $*" >&2; exit 2; }

for tool in taskset python3 cargo timeout; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
for v in ROUNDS N K; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"
done
if (( $(nproc --all) <= (SERVER_CPU > LOAD_CPU ? SERVER_CPU : LOAD_CPU) )); then
    die "need cores $SERVER_CPU and $LOAD_CPU; this machine has $(nproc --all)"
fi
# The peers do not raise their own open-file limit (Switchboard and the load
# generator do): raise the soft limit for everything started from here.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $(ulimit -n) != unlimited ]] && (( $(ulimit -n) < N + 64 )); then
    echo "compare-fanout.sh: warning: the open-file limit is $(ulimit -n) for $N subscribers" >&2
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
JSONL=benches/results/compare-fanout-$STAMP.jsonl
LOG=benches/results/compare-fanout-$STAMP.log
: >"$JSONL"
: >"$LOG"

port_of() {
    case $1 in
        switchboard) echo $((BASE_PORT)) ;;
        tokio-tungstenite) echo $((BASE_PORT + 1)) ;;
        fastwebsockets) echo $((BASE_PORT + 2)) ;;
    esac
}

# The servers close TCP first, so each run leaves its N connections in
# TIME_WAIT (60 s) on the server's port; and the load generator dials from
# the same source ports every run (32768 and up). A SYN that meets such a
# socket can get a stale ACK and is retried a second later (1 s dial times,
# seen here with 1,000 subscribers). So each run takes a port with no
# sockets on it: the server's own, or +3, +6, ...
pick_port() {
    local p=$1
    command -v ss >/dev/null || { echo "$p"; return; }
    for _ in $(seq 64); do
        [[ -z $(ss -Htan "sport = :$p" | head -n 1) ]] && break
        p=$((p + 3))
    done
    echo "$p"
}

# "busy total" jiffies of core $1 (from /proc/stat), then the jiffies of
# process $2 (0 if it is gone): to tell how much of the server's core other
# work took during a run.
core_sample() {
    python3 - "$1" "$2" <<'EOF'
import sys
core, pid = sys.argv[1], sys.argv[2]
for line in open("/proc/stat"):
    f = line.split()
    if f[0] == "cpu" + core:
        t = [int(x) for x in f[1:]]
        total = sum(t[:8])
        busy = total - t[3] - t[4]
try:
    st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    proc = int(st[11]) + int(st[12])
except OSError:
    proc = 0
print(busy, total, proc)
EOF
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
    port=$(pick_port "$(port_of "$name")")
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
    printf '   round %d  %-18s port %-5s pid %-7s cpus %-3s load %s ... ' \
        "$round" "$name" "$port" "$SERVER_PID" "$affinity" "$loadavg"
    local before after other
    before=$(core_sample "$SERVER_CPU" "$SERVER_PID")
    rc=0
    # Setup (N / RAMP s), warmup, the window, the drain and the close fit
    # well inside this.
    taskset -c "$LOAD_CPU" timeout -k 5 $((DURATION + 60 + N / RAMP)) "$LOAD_BIN" \
        --url "ws://127.0.0.1:$port/ws" --pid "$SERVER_PID" --json \
        fanout -n "$N" -k "$K" -s "$SIZE" -t "$DURATION" --ramp "$RAMP" >"$out" 2>&1 || rc=$?
    after=$(core_sample "$SERVER_CPU" "$SERVER_PID")
    # Share of core SERVER_CPU used by anything but the server over the whole
    # run (setup and drain included), in percent; softirq time of the
    # loopback traffic not charged to the server counts here too (a few %).
    # shellcheck disable=SC2086 # six numbers
    other=$(python3 -c '
import sys
b0, t0, p0, b1, t1, p1 = map(int, sys.argv[1:])
print(round(100 * max(0, (b1 - b0) - (p1 - p0)) / max(1, t1 - t0), 1) if p1 else "null")' $before $after)
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "   $name (pid $SERVER_PID) exited during the run" >>"$LOG"
    fi
    stop_server
    {
        echo "---- round $round: $name (port $port, load generator exit $rc, loadavg $loadavg, other work on cpu $SERVER_CPU: $other%)"
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
        SERVER=$name ROUND=$round RC=$rc LOADAVG=$loadavg OTHER=$other python3 -c '
import json, os, sys
raw = json.loads(sys.argv[1])
line = {"server_name": os.environ["SERVER"], "round": int(os.environ["ROUND"]),
        "exit_status": int(os.environ["RC"]), "loadavg": os.environ["LOADAVG"],
        "server_core_other_pct": json.loads(os.environ["OTHER"])}
line.update(raw)
print(json.dumps(line))' "$json" >>"$JSONL"
        OTHER=$other python3 -c '
import json, os, sys
r = json.loads(sys.argv[1])
other = os.environ["OTHER"]
s = r.get("server") or {}
dps = r.get("deliveries_per_sec") or 0
us = s.get("cpu_us_per_delivery")
cores = s.get("cpu_cores") or 0
p99 = (r.get("latency_us") or {}).get("p99")
errs = (r.get("errors") or {}).get("total", "?")
us = "-" if us is None else format(us, ".3f")
p99 = "-" if p99 is None else format(p99 / 1000, ".2f")
subs = str(r.get("subscribed")) + "/" + str(r.get("subscribers"))
print(f"{dps:>11,.0f} deliveries/s  {us:>6} us/delivery  server {cores:.2f} cores  "
      f"p99 {p99} ms  subscribed {subs}  errors {errs}  other work on its core {other}%")' "$json"
    fi
    local noise
    noise=$(grep -cv 'listening on' "$errfile" || true)
    if ((noise > 0)); then
        echo "   ($name wrote $noise line(s) to stderr; see $LOG)"
    fi
    rm -f "$errfile" "$out"
}

SB_STATE="$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (+ uncommitted changes in src/ or Cargo.toml)')"
echo "== machine: $(nproc --all) cores; uptime:$(uptime | sed 's/.*up/ up/')"
echo "== switchboard: $SB_STATE"
echo "== fanout: $N subscribers, $K publishes in flight, $SIZE B data, ramp $RAMP/s, ${DURATION}s x $ROUNDS rounds;" \
    "servers on cpu $SERVER_CPU, load generator on cpu $LOAD_CPU"
{
    echo "compare-fanout.sh $STAMP  rounds $ROUNDS duration $DURATION n $N k $K size $SIZE ramp $RAMP"
    echo "uptime: $(uptime)"
    echo "switchboard: $SB_STATE"
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

def lat(r, q):
    v = (r.get("latency_us") or {}).get(q)
    return v / 1000 if isinstance(v, (int, float)) else None

rows = {}
for s in servers:
    rs = runs.get(s, [])
    rows[s] = {
        "n": len(rs),
        "dps": med([r.get("deliveries_per_sec") for r in rs]),
        "pps": med([r.get("publishes_per_sec") for r in rs]),
        "us": med([(r.get("server") or {}).get("cpu_us_per_delivery") for r in rs]),
        "cores": med([(r.get("server") or {}).get("cpu_cores") for r in rs]),
        "p50": med([lat(r, "p50") for r in rs]),
        "p99": med([lat(r, "p99") for r in rs]),
        "p999": med([lat(r, "p999") for r in rs]),
        "errors": sum(((r.get("errors") or {}).get("total") or 0) for r in rs),
        "slow": sum((r.get("slow_path_messages") or 0) for r in rs),
        "bad_exit": sum(1 for r in rs if r.get("exit_status")),
        "all_dps": [r.get("deliveries_per_sec") for r in rs],
        "all_us": [(r.get("server") or {}).get("cpu_us_per_delivery") for r in rs],
        "all_load": [r.get("loadavg", "?").split()[0] for r in rs],
        "all_other": [r.get("server_core_other_pct") for r in rs],
    }

print()
print("median over rounds (server on 1 core; lower us/delivery is better; latency in ms)")
print(f"{'server':<20}{'runs':>5}{'deliveries/s':>14}{'publishes/s':>13}{'us/delivery':>13}"
      f"{'cores':>7}{'p50':>8}{'p99':>8}{'p99.9':>8}{'errors':>8}")
for s in servers:
    r = rows[s]
    print(f"{s:<20}{r['n']:>5}{fmt(r['dps'], ',.0f'):>14}{fmt(r['pps'], ',.0f'):>13}"
          f"{fmt(r['us'], '.3f'):>13}{fmt(r['cores'], '.2f'):>7}{fmt(r['p50'], '.2f'):>8}"
          f"{fmt(r['p99'], '.2f'):>8}{fmt(r['p999'], '.2f'):>8}{r['errors']:>8}")
print()
print("per round:")
for s in servers:
    r = rows[s]
    print(f"  {s:<18} deliveries/s {', '.join(fmt(x, ',.0f') for x in r['all_dps'])}   "
          f"us/delivery {', '.join(fmt(x, '.3f') for x in r['all_us'])}   "
          f"load {', '.join(r['all_load'])}   other work on the server's core % "
          f"{', '.join(fmt(x, '.1f') for x in r['all_other'])}")
print()
sb = rows["switchboard"]
for peer in servers[1:]:
    p = rows[peer]
    cpu = sb["us"] / p["us"] if sb["us"] and p["us"] else None
    thr = sb["dps"] / p["dps"] if sb["dps"] and p["dps"] else None
    print(f"switchboard / {peer:<18} server CPU per delivery {fmt(cpu, '.2f')}   deliveries/s {fmt(thr, '.2f')}")
bad = {s: rows[s]["bad_exit"] for s in servers if rows[s]["bad_exit"]}
if bad:
    print(f"\nruns where the load generator reported errors (exit status != 0): {bad}")
slow = {s: rows[s]["slow"] for s in servers if rows[s]["slow"]}
if slow:
    print(f"messages whose envelope missed the load generator's fast path: {slow}")
EOF
echo
echo "raw results: $JSONL"
echo "run reports and server stderr: $LOG"
