#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzingclient (cases 1-7, 9, 10) against the
# raw echo endpoint of a release build of switchboard.
#
#   bash tests/autobahn/run.sh            # all cases in fuzzingclient.json
#   AUTOBAHN_CASES='6.4.*,7.*' bash tests/autobahn/run.sh
#
# autobahntestsuite (25.10.1 on PyPI included) is Python 2 code: it needs a
# CPython 2.7. The script finds one (AUTOBAHN_PYTHON2, a working python2.7 on
# PATH, or pyenv's 2.7.x), builds a 2.7 virtualenv with virtualenv<20.22 (the
# last line that can create 2.7 environments, run from a Python 3 venv) and
# installs the pinned requirements.txt beside this script.
#
# Environment:
#   AUTOBAHN_VENV     the 2.7 venv              (default /tmp/autobahn-py27)
#   AUTOBAHN_OUTDIR   where reports go          (default /tmp/autobahn-reports)
#   AUTOBAHN_CASES    comma list overriding the spec's "cases"
#   AUTOBAHN_PYTHON2  path to a python2.7 binary
#   AUTOBAHN_NO_BUILD set to 1 to skip `cargo build --release`
#
# Prints a count per behavior and every case that is not OK/INFORMATIONAL;
# exits 1 if any case (or its close behavior) FAILED.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${AUTOBAHN_VENV:-/tmp/autobahn-py27}"
outdir="${AUTOBAHN_OUTDIR:-/tmp/autobahn-reports}"
work="$(mktemp -d /tmp/autobahn-run.XXXXXX)"
server_pid=""

cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

find_python2() {
    if [[ -n "${AUTOBAHN_PYTHON2:-}" ]]; then
        echo "$AUTOBAHN_PYTHON2"; return 0
    fi
    if command -v python2.7 >/dev/null 2>&1 && python2.7 --version >/dev/null 2>&1; then
        command -v python2.7; return 0
    fi
    local pyroot=""
    if command -v pyenv >/dev/null 2>&1; then pyroot="$(pyenv root)"; fi
    for p in "$pyroot"/versions/2.7*/bin/python2.7 "$HOME"/.pyenv/versions/2.7*/bin/python2.7 \
             /usr/bin/python2.7 /usr/local/bin/python2.7; do
        if [[ -x "$p" ]] && "$p" --version >/dev/null 2>&1; then echo "$p"; return 0; fi
    done
    return 1
}

if [[ ! -x "$venv/bin/wstest" ]]; then
    py2="$(find_python2)" || {
        echo "autobahn: no CPython 2.7 found (autobahntestsuite does not run on Python 3);" >&2
        echo "autobahn: set AUTOBAHN_PYTHON2 or install one (e.g. pyenv install 2.7.18)" >&2
        exit 2
    }
    echo "autobahn: creating $venv with $py2"
    tool="$venv-tool"
    if [[ ! -x "$tool/bin/virtualenv" ]]; then
        python3 -m venv "$tool"
        "$tool/bin/pip" install -q 'virtualenv<20.22'
    fi
    rm -rf "$venv"
    "$tool/bin/virtualenv" -q -p "$py2" "$venv"
    "$venv/bin/pip" install -q --no-python-version-warning -r "$here/requirements.txt"
fi

if [[ "${AUTOBAHN_NO_BUILD:-0}" != 1 ]]; then
    (cd "$root" && cargo build --release --bin switchboard)
fi

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

SWITCHBOARD_MAX_FRAME_SIZE=16777216 \
SWITCHBOARD_MAX_MESSAGE_SIZE=16777216 \
SWITCHBOARD_MAX_OUTBOUND_BYTES=67108864 \
    "$root/target/release/switchboard" serve --port "$port" --shards 2 --log-level warn \
    >"$work/server.log" 2>&1 &
server_pid=$!

for _ in $(seq 1 100); do
    if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1",int(sys.argv[1])),0.2)' "$port" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "autobahn: server exited early:" >&2; cat "$work/server.log" >&2; exit 2
    fi
    sleep 0.1
done

rm -rf "$outdir"
python3 - "$here/fuzzingclient.json" "$work/spec.json" "$port" "$outdir" "${AUTOBAHN_CASES:-}" <<'EOF'
import json, sys
src, dst, port, outdir, cases = sys.argv[1:]
spec = json.load(open(src))
spec["outdir"] = outdir
for s in spec["servers"]:
    s["url"] = "ws://127.0.0.1:%s/echo" % port
if cases:
    spec["cases"] = [c.strip() for c in cases.split(",") if c.strip()]
json.dump(spec, open(dst, "w"), indent=1)
EOF

echo "autobahn: switchboard on 127.0.0.1:$port, reports in $outdir"
(cd "$work" && "$venv/bin/wstest" -m fuzzingclient -s "$work/spec.json") >"$work/wstest.log" 2>&1 || {
    echo "autobahn: wstest failed:" >&2; tail -40 "$work/wstest.log" >&2; exit 2
}

if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "autobahn: server died during the run:" >&2; cat "$work/server.log" >&2
fi

python3 - "$outdir/index.json" <<'EOF'
import collections, json, sys
idx = json.load(open(sys.argv[1]))
failed = 0
for agent, cases in idx.items():
    beh = collections.Counter(c["behavior"] for c in cases.values())
    clo = collections.Counter(c["behaviorClose"] for c in cases.values())
    print("%s: %d cases" % (agent, len(cases)))
    print("  behavior:      " + ", ".join("%s=%d" % kv for kv in sorted(beh.items())))
    print("  behaviorClose: " + ", ".join("%s=%d" % kv for kv in sorted(clo.items())))
    key = lambda s: [int(x) for x in s.split(".")]
    for cid in sorted(cases, key=key):
        c = cases[cid]
        if c["behavior"] in ("OK", "INFORMATIONAL") and c["behaviorClose"] in ("OK", "INFORMATIONAL"):
            continue
        print("  %-8s behavior=%s close=%s remoteCloseCode=%s (%s)" % (
            cid, c["behavior"], c["behaviorClose"], c.get("remoteCloseCode"), c["reportfile"]))
        if "FAILED" in (c["behavior"], c["behaviorClose"]):
            failed += 1
print("autobahn: %d case(s) FAILED" % failed)
sys.exit(1 if failed else 0)
EOF
