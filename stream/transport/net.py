"""Network helpers shared by the CLI, tests and benchmarks."""

from __future__ import annotations

import random
import socket


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # the Linux default


def free_port_block(n: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port p such that p .. p+n-1 are free now on ``host``.

    The block is taken below the kernel's ephemeral range, so that the random ports other
    servers are given meanwhile (dask, the coordinator's report socket) cannot land on it.
    """
    eph_lo, _ = _ephemeral_range()
    lo, hi = (10000, eph_lo - n) if eph_lo - n > 10000 else (1024, 65535 - n)
    for _ in range(tries):
        base = random.randint(lo, hi)
        socks = []
        try:
            for k in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind((host, base + k))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no block of {n} free ports found on {host}")
