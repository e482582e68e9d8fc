#!/usr/bin/env python3
"""Memory under hostile connections (issue 11, item 5): RSS of a broker while N connections
declare a 16 MiB frame and send nothing, while N connections send part of a 16 MiB body, and
after they close, over several identical rounds (a ratchet shows as growth across rounds).

    perf/memory_storm.py [--bin target/release/ringmq] [--conns 300] [--rounds 5]
                         [--partial-kib 2048] [-- extra serve flags]

Prints one line per measurement; RSS from /proc/PID/status (VmRSS).
"""
import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return -1


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def storm(port, conns, body_bytes):
    """Opens `conns` connections, each declaring a 16 MiB frame and sending `body_bytes`."""
    socks = []
    junk = b"\x07" * body_bytes
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(0.2)
        try:
            s.sendall(struct.pack("<I", 16 << 20))
            if junk:
                s.sendall(junk)
        except (socket.timeout, OSError):
            pass  # the broker stopped reading: backpressure
        socks.append(s)
    return socks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/ringmq")
    ap.add_argument("--conns", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--partial-kib", type=int, default=2048)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    data = tempfile.mkdtemp(prefix="ringmq-storm-", dir=os.getcwd())
    port = free_port()
    broker = subprocess.Popen(
        [a.bin, "serve", "--data", data, "--listen", f"127.0.0.1:{port}", *a.extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in broker.stdout:
        if "listening on" in line:
            break
    pid = broker.pid
    print(f"bin {a.bin} conns {a.conns} partial {a.partial_kib} KiB extra {a.extra}")
    print(f"baseline RSS {rss_mb(pid):.0f} MB")
    try:
        for r in range(a.rounds):
            socks = storm(port, a.conns, 0)
            time.sleep(0.5)
            declared = rss_mb(pid)
            partial = storm(port, a.conns, a.partial_kib * 1024)
            time.sleep(0.5)
            peak = rss_mb(pid)
            for s in socks + partial:
                s.close()
            time.sleep(1.5)
            after = rss_mb(pid)
            print(f"round {r + 1}: declared-only {declared:.0f} MB, with partial bodies "
                  f"{peak:.0f} MB, after close {after:.0f} MB")
    finally:
        broker.kill()
        broker.wait()
        subprocess.run(["rm", "-rf", data])


if __name__ == "__main__":
    sys.exit(main())
