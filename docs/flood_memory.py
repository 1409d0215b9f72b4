"""Memory after a flood (issue 12.13): start `switchboard serve` (the binary
given first) on PORT with SQLite storage in a temporary directory and
`history.size = 1`, connect 30 subscribers that never read (4 channels) and
4 publishers that pipeline 100 publications of 900 KiB each, close
everything, wait 5 s, and print the server's RSS before, at its peak and
after. Extra arguments are environment variables for the server (try
MALLOC_MMAP_THRESHOLD_=131072, or LD_PRELOAD of another allocator).

    python3 docs/flood_memory.py target/release/switchboard 9811 [VAR=value ...]

Results: docs/BENCHMARKS.md, "Memory after a flood".
"""
import os, socket, subprocess, sys, time, json, tempfile, threading, struct

BIN = sys.argv[1]
PORT = int(sys.argv[2])
env_extra = dict(a.split('=',1) for a in sys.argv[3:])

def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1]) * 1024
    return 0

def ws(user):
    s = socket.create_connection(("127.0.0.1", PORT))
    s.sendall(f"GET /ws?userId={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    return s

def frame(payload):
    b = bytearray([0x81])
    n = len(payload)
    if n < 126: b.append(0x80 | n)
    elif n < 65536: b.append(0x80 | 126); b += struct.pack(">H", n)
    else: b.append(0x80 | 127); b += struct.pack(">Q", n)
    b += b"\0\0\0\0"  # zero mask
    b += payload
    return bytes(b)

d = tempfile.mkdtemp()
env = dict(os.environ, **env_extra)
env.update({"SWITCHBOARD_STORAGE_DATA_DIR": d, "SWITCHBOARD_HISTORY_SIZE": "1", "SWITCHBOARD_STORAGE_SYNCHRONOUS": "normal"})
p = subprocess.Popen([BIN, "serve", "--port", str(PORT), "--shards", "2", "--log-level", "error"], env=env)
time.sleep(1.0)
base = rss(p.pid)
peak = base
stop = False
def sample():
    global peak
    while not stop:
        peak = max(peak, rss(p.pid)); time.sleep(0.02)
t = threading.Thread(target=sample); t.start()
# 30 subscribers that never read, on 4 channels; 4 publishers pipelining 1 MB publications.
subs = []
for i in range(30):
    s = ws(f"s{i}"); s.sendall(frame(json.dumps({"type":"subscribe","channel":f"public:c{i%4}"}).encode())); subs.append(s)
data = "x" * (900 << 10)
pubs = []
def flood(i):
    s = ws(f"p{i}")
    msg = frame(json.dumps({"type":"publish","channel":f"public:c{i}","data":data}).encode())
    def drain():
        try:
            while s.recv(65536): pass
        except Exception: pass
    threading.Thread(target=drain, daemon=True).start()
    for _ in range(100):
        s.sendall(msg)
    pubs.append(s)
ths = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
[x.start() for x in ths]; [x.join() for x in ths]
time.sleep(3)
for s in subs + pubs:
    s.close()
time.sleep(5)
stop = True; t.join()
after = rss(p.pid)
p.terminate(); p.wait()
print(json.dumps({"env": env_extra, "base_mib": round(base/2**20,1), "peak_mib": round(peak/2**20,1), "after_idle_mib": round(after/2**20,1)}))
