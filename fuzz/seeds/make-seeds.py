#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs (a few valid ones each) into seeds/<target>/,
so every fuzzer starts from valid structure. Run from anywhere; the files it writes
are committed, this script is how to make them again after a format changes."""
import hashlib
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# frame_decoder: header = type u8 | 3 zero bytes | payload length u32 LE.
def frame(t, payload):
    return struct.pack("<B3xI", t, len(payload)) + payload


def s16(s):
    return struct.pack("<H", len(s)) + s


hello = frame(0x01, struct.pack("<H", 2) + s16(b"m1") + s16(b"sda") + bytes(16)
              + struct.pack("<QQQ", 0, 5, 1 << 20))
write = frame(0x10, struct.pack("<QQ", 5, 4096) + b"hello world")
put("frame_decoder", "hello", hello)
put("frame_decoder", "hello-write", hello + write)

# nbd_session: what a client sends (big-endian): flags, options, requests.
IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513


def opt(o, data):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def req(kind, handle, offset, length, flags=0):
    return struct.pack(">IHHQQI", REQ, flags, kind, handle, offset, length)


go = opt(7, struct.pack(">I", 1) + b"d" + struct.pack(">H", 0))
flags = struct.pack(">I", 3)
put("nbd_session", "go-write-read",
    flags + go + req(1, 1, 512, 4) + b"abcd" + req(0, 2, 512, 4) + req(3, 3, 0, 0) + req(2, 4, 0, 0))
put("nbd_session", "list-info-export",
    flags + opt(3, b"") + opt(6, struct.pack(">I", 1) + b"d" + struct.pack(">H", 0))
    + opt(1, b"d") + req(6, 1, 0, 4096, flags=1) + req(4, 2, 4096, 512) + req(2, 3, 0, 0))
put("nbd_session", "abort", flags + opt(99, b"x") + opt(2, b""))

# open_object: odd first byte seals chunks (flip_at u16, flip_xor u8, (len, repeat, bytes)*).
put("open_object", "seal-two-chunks", b"\x01" + struct.pack("<HB", 0, 0)
    + b"\x05\x00hello" + b"\x03\x40abc")
put("open_object", "seal-flip", b"\x01" + struct.pack("<HB", 90, 1) + b"\x04\x00data")
header = (b"FERRYOBJ" + struct.pack("<HBBI", 1, 1, 0, 0) + bytes([0x11]) * 16
          + bytes(range(16)) + bytes(32))
put("open_object", "raw-header-one-chunk", b"\x00" + header
    + struct.pack("<IBBHI", 16 + 4, 0, 1, 0, 4) + b"abcd" + bytes(16))

# write_records: seq, offset, len u64 LE | kind u8 (1 data, 2 zero) | 7 zero bytes | data.
def rec(seq, off, data=None, zero_len=0):
    if data is None:
        return struct.pack("<QQQB7x", seq, off, zero_len, 2)
    return struct.pack("<QQQB7x", seq, off, len(data), 1) + data


put("write_records", "data-and-hole", rec(1, 4096, b"abc") + rec(2, 0, zero_len=1 << 40))
put("write_records", "split-write", rec(3, 0, b"x" * 64) + rec(3, 64, b"y" * 32))

# block_sums: block_bytes u64 | disk_bytes u64 | ceil(disk/block) sums of 16 bytes.
put("block_sums", "three-blocks", struct.pack("<QQ", 4096, 3 * 4096 - 100)
    + bytes(16) + bytes(range(16)) + b"\xff" * 16)
put("block_sums", "empty-disk", struct.pack("<QQ", 65536, 0))

# metadata: one JSON line per object (the target frames each with its digest).
DISK_ID = "00112233445566778899aabbccddeeff"
T = "2026-12-06T03:00:00Z"
base = {"generation": "g1", "seq": 9, "disk_bytes": 1 << 20, "extent_bytes": 1 << 16,
        "extents": [{"index": 0, "object": "ext/0", "stored_bytes": 100}]}
point = {"id": "p1", "kind": "crash", "time": T, "seq": 12, "disk_bytes": 1 << 20,
         "label": "nightly", "sums": "sums/1"}
c0 = {"format": 2, "commit": 0, "disk_id": DISK_ID, "kind": "checkpoint", "time": T,
      "next_seq": 10, "base": base, "segments": [], "points": []}
c1 = {"format": 2, "commit": 1, "disk_id": DISK_ID, "kind": "append", "time": T,
      "next_seq": 20, "segments": [{"object": "seg/1", "first_seq": 10, "last_seq": 19,
                                    "stored_bytes": 4096}], "points": [point]}
info = {"format": 1, "machine": "m", "disk": "d", "disk_id": DISK_ID, "block_bytes": 4096,
        "extent_bytes": 1 << 26, "created": T, "vault_key_id": "v1",
        "data_key": {"id": "k1", "salt": "00" * 32, "wrapped": "11" * 48}}


def line(v):
    return json.dumps(v, separators=(",", ":")).encode()


put("metadata", "commits", line(c0) + b"\n" + line(c1))
put("metadata", "disk-info", line(info))
# Numbers a few steps below u64::MAX, so that digit mutations reach the edge.
M = (1 << 64) - 1
near = dict(c0, commit=M - 3, next_seq=M - 1,
            base=dict(base, seq=M - 4, extents=[{"index": 0, "object": "e", "stored_bytes": 100}]),
            segments=[{"object": "s", "first_seq": M - 3, "last_seq": M - 2, "stored_bytes": 200}])
put("metadata", "near-max", line(near) + b"\n" + line(dict(c1, commit=M - 2, next_seq=M - 1, segments=[], points=[])))
put("metadata", "hint-and-point", line({"format": 1, "checkpoint": 0}) + b"\n" + line(point))
j = line(c0)
put("metadata", "framed-commit", j + b"\nsha256 " + hashlib.sha256(j).hexdigest().encode() + b"\n")


# cache_log: flags u8 | first file number u64 LE | (len u16 LE, file){1,3}.
def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def log_rec(file_no, disk, payload):
    crc = crc32c(payload, crc32c(disk, crc32c(struct.pack("<Q", file_no))))
    return struct.pack("<HII", 0xFC02, len(payload), crc) + bytes([len(disk)]) + disk + payload


f0 = log_rec(7, b"m/d", b"one") + log_rec(7, b"m/d", b"two")
f1 = log_rec(8, b"m/e", b"three") + b"\x02\xfc torn"
put("cache_log", "two-files-torn-tail", b"\x00" + struct.pack("<Q", 7)
    + struct.pack("<H", len(f0)) + f0 + struct.pack("<H", len(f1)) + f1)
r0 = log_rec(0, b"a/b", b"x" * 40)
put("cache_log", "recycle-with-spare", b"\x03" + struct.pack("<QH", 0, len(r0)) + r0)

# group_line: what a peer sends, line by line.
put("group_line", "member", b"prepare g1 g-20261206T030000.000Z-0000abcd\ncommit g-1\nabort\n")
put("group_line", "coordinator", b"ready\nno disk sda: journal full\ndone 1234\n")
