"""Network helpers shared by the CLI, tests and benchmarks."""

from __future__ import annotations

import socket


def free_port_block(n: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """A port p such that p .. p+n-1 are free now on ``host``."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
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
