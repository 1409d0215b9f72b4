#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/<target>/seed-<name>.

Run from anywhere: python3 fuzz/make_seeds.py. Only files named seed-* are
kept by git (see the root .gitignore); whatever libFuzzer adds next to them
stays local.

Client frames follow RFC 6455 5.2: byte0 = FIN<<7 | opcode,
byte1 = 0x80 | len (126 + u16, or 127 + u64, for longer payloads),
then the 4-byte mask, then payload[i] ^ mask[i % 4].
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
MASK = bytes([0x37, 0xFA, 0x21, 0x3D])


def frame(fin, opcode, payload, mask=MASK, force_len_form=None):
    """A masked client frame. force_len_form=127 writes a (non-minimal) u64 length."""
    out = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    form = force_len_form or (n if n < 126 else (126 if n <= 0xFFFF else 127))
    if form == 126:
        out += bytes([0x80 | 126]) + struct.pack(">H", n)
    elif form == 127:
        out += bytes([0x80 | 127]) + struct.pack(">Q", n)
    else:
        out += bytes([0x80 | n])
    out += mask
    out += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out)


def header_only(fin, opcode, declared_len, mask=MASK):
    """A 127-form header declaring `declared_len` bytes, with no payload."""
    b0 = (0x80 if fin else 0) | opcode
    return bytes([b0, 0x80 | 127]) + struct.pack(">Q", declared_len) + mask


def cuts(*offsets, every_byte=False):
    """frame_decoder's prefix: ctl byte (cut count, 0x80 = also every byte), u16 LE cuts."""
    assert len(offsets) <= 7
    ctl = len(offsets) | (0x80 if every_byte else 0)
    return bytes([ctl]) + b"".join(struct.pack("<H", o) for o in offsets)


FRAMES = {
    "text": frame(True, 0x1, b"hello, switchboard"),
    "binary": frame(True, 0x2, bytes(range(40))),
    "fragmented-text-ping": frame(False, 0x1, "κόσ".encode())
    + frame(True, 0x9, b"ping")
    + frame(False, 0x0, "με ".encode())
    + frame(True, 0x0, b"world"),
    "close-1000": frame(True, 0x8, struct.pack(">H", 1000) + b"bye"),
    "len126": frame(True, 0x2, bytes(i % 251 for i in range(300))),
    "len127": frame(True, 0x1, b"x" * 200, force_len_form=127),
    # Declares 70000 bytes: over max_frame, refused from the header alone.
    "len127-toobig": header_only(True, 0x2, 70000) + b"\x00" * 16,
    "text-then-close": frame(True, 0x1, b"last words")
    + frame(True, 0x8, struct.pack(">H", 1000))
    + frame(True, 0x1, b"ignored after close"),
}

HTTP = {
    "upgrade": (
        b"GET /ws HTTP/1.1\r\n"
        b"Host: localhost:9000\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"\r\n"
    ),
    "query": (
        b"GET /echo?token=a%20b&room=lobby+1&flag HTTP/1.1\r\n"
        b"Host: example.test\r\n"
        b"Upgrade: WebSocket\r\n"
        b"Connection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Origin: http://example.test\r\n"
        b"Authorization: Bearer abc.def\r\n"
        b"\r\n"
    ),
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\nGET / HTTP/1.1\r\n",
    "http10": b"GET / HTTP/1.0\r\nHost: h\r\n\r\n",
    "bare-lf": b"GET /ws?x=%zz HTTP/1.1\nHost: h\nUpgrade: websocket\nConnection: upgrade\n\n",
}
HTTP["trailing-frame"] = HTTP["upgrade"] + FRAMES["text"]


# channel_policy: first id, 0xFF, second id, 0xFF, channel rest.
POLICY = {
    "separator": b"alice\xffalice:bob\xffbob",
    "lookalike": b"alice\xffalicex\xffx",
    "star": b"a*\xffa\xff*",
    "unicode": "\u00e9".encode() + b"\xff" + "e\u0301".encode() + b"\xff" + "\u00e9:x".encode(),
}


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def main():
    for name, data in HTTP.items():
        write("http_upgrade", name, data)
    for name, data in FRAMES.items():
        write("frame_header", name, data)
    # frame_decoder: whole stream, a few cuts, and byte-at-a-time.
    for name, data in FRAMES.items():
        write("frame_decoder", name, cuts() + data)
        write("frame_decoder", name + "-cut", cuts(1, 7, len(data) // 2) + data)
    write("frame_decoder", "fragmented-text-ping-bytewise",
          cuts(every_byte=True) + FRAMES["fragmented-text-ping"])
    for name, data in POLICY.items():
        write("channel_policy", name, data)
    # socketio: Engine.IO text frames separated by 0xFF; an even first
    # byte sends a CONNECT to / first.
    for name, frames in SOCKETIO.items():
        write("socketio", name, b"\xff".join(frames))


SOCKETIO = {
    "connect-events-acks": [b"0", b"40/custom,", b"42[\"ping\"]", b"427[\"ping\"]",
                            b"42/custom,3[\"subscribe\",{\"channel\":\"news\"}]",
                            b"42[\"publish\",{\"channel\":\"news\",\"data\":[1]}]"],
    "connect-auth-payload": [b"1", b"40{\"token\":\"abc\"}", b"40/nope,", b"2probe", b"3"],
    "bad-packets": [b"0", b"42[\"ping\",\"x\"]", b"42[\"ping\",{\"type\":1}]",
                    b"451-[\"a\",{\"_placeholder\":true,\"num\":0}]"],
    "disconnect": [b"0", b"40/custom,", b"41/custom,", b"41"],
    # \xfe starts a binary frame (an attachment); the second byte's bit 0
    # switches the conformance echo on.
    "binary-conformance": [b"01", b"452-[\"message\",{\"_placeholder\":true,\"num\":0},{\"_placeholder\":true,\"num\":1}]",
                           b"\xfe\x01\x02", b"\xfe\x03", b"451-7[\"message-with-ack\",{\"_placeholder\":true,\"num\":0}]", b"\xfe\x00"],
    "binary-native": [b"0", b"451-[\"publish\",{\"_placeholder\":true,\"num\":0}]", b"\xfe\x09", b"\xfe\x09"],
}


if __name__ == "__main__":
    main()
