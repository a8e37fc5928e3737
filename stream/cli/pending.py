"""``stemstream pending``: scans a running session could not write yet, and how to finish them.

    stemstream pending                          # what every session of yours is holding
    stemstream pending --retry                  # try writing them now (after fixing the disk)
    stemstream pending --finish SCAN --to DIR   # write one somewhere else, and wait for it
    stemstream pending --drop SCAN              # give one up (its frames are lost)

A session holds a scan when its output directory cannot be written (read-only, full, gone):
the scan's data stays in the workers' memory (or a finished file in a worker's staging
directory) and is retried every minute at most; with ``[output] fallback_dir`` the file is
written there and moved into the output directory later. Sessions are reached through their
control sockets (stream/session/ask.py), which only this user can open.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


class PendingError(Exception):
    """A user error: printed as one line, exit code 2."""


def add_pending_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--session", type=int, metavar="PID", help="only the session of this process id")
    p.add_argument("--retry", nargs="?", const="", metavar="SCAN",
                   help="try writing every held scan (or SCAN) now, instead of at its next retry")
    p.add_argument("--finish", metavar="SCAN", help="write this held scan into --to DIR, and wait for it")
    p.add_argument("--to", metavar="DIR", help="with --finish: the directory to write it in")
    p.add_argument("--drop", metavar="SCAN", help="give this held scan up: its frames are discarded")
    p.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="with --finish: how long to wait for the file (default 120)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _age(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_session(about: dict, answer: dict) -> str:
    s = answer["session"]
    lines = [f"session {about['pid']} (writing to {s['out']}"
             + (f"; fallback {s['fallback']}" if s.get("fallback") else "")
             + f"; {len(s['workers'])} workers)"]
    held = answer["held"]
    for h in held:
        since = _age(time.time() - h["since"])
        if h["state"] == "held":
            state = "being written now" if h["writing"] else \
                f"{h['attempts']} attempts, next in {h['next_try_s']:.0f} s"
            lines.append(f"  {h['scan_id']}  held for {since}: {h['frames_received']:,}/{h['n_frames']:,} "
                         f"frames, {h['events'] / 1e6:.2f} M e- (closed: {h['closed']}); in {h['where']}; {state}")
            if h["target"]:
                lines.append(f"  {'':{len(h['scan_id'])}}  going to {h['target']}")
        else:
            lines.append(f"  {h['scan_id']}  written to the fallback directory {since} ago: {h['where']}; "
                         f"it moves to {s['out']} when that can be written")
        if h["error"]:
            lines.append(f"  {'':{len(h['scan_id'])}}  last error: {h['error']}")
    if not held:
        lines.append("  nothing held: every scan it closed is written")
    elif any(h["state"] == "held" for h in held):
        first = next(h["scan_id"] for h in held if h["state"] == "held")
        lines.append(f"  to finish: make {s['out']} writable or free space there (they are retried "
                     f"automatically; 'stemstream pending --retry' tries now), or 'stemstream pending "
                     f"--finish {first} --to DIR'")
    return "\n".join(lines)


def run_pending(args) -> int:
    try:
        return _run(args)
    except PendingError as e:
        print(f"stemstream pending: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from stream.session.ask import ControlError, ask, sessions

    if args.finish and not args.to:
        raise PendingError("--finish SCAN needs --to DIR: the directory to write the scan in")
    if args.to and not args.finish:
        raise PendingError("--to DIR goes with --finish SCAN")
    try:
        found = [s for s in sessions() if args.session in (None, s["pid"])]
    except ControlError as e:
        raise PendingError(str(e)) from None
    if not found:
        where = f" with process id {args.session}" if args.session else ""
        print(f"no running stemstream session{where} of this user: nothing is held (scans are held "
              "only by a running session; files in a fallback directory are ordinary scan files)")
        return 0 if not (args.finish or args.drop or args.retry is not None) else 2
    scan = args.finish or args.drop or args.retry or None
    op = "finish" if args.finish else "drop" if args.drop else "retry" if args.retry is not None else None
    out, status, refused = [], 0, []
    for about in found:
        try:
            if op is not None:
                req = {"op": op, "scan": scan}
                if op == "finish":
                    req["to"] = args.to
                answer = ask(about["address"], req)
                if not answer.get("ok"):
                    refused.append(f"session {about['pid']}: {answer.get('error', 'refused')}")
                    continue  # another session may hold it
                if op == "finish":
                    return _wait_finished(about, scan, args.wait)
                print(f"session {about['pid']}: {op} {', '.join(answer['scans']) or 'nothing held'}")
                continue
            answer = ask(about["address"], {"op": "list"})
        except ControlError as e:
            print(f"session {about['pid']}: {e}")
            status = 1
            continue
        out.append((about, answer))
    if op is not None and refused and len(refused) == len(found):  # no session took it
        raise PendingError(refused[0] if len(found) == 1 else
                           f"no running session holds scan {scan} ({'; '.join(refused)})")
    if op is None:
        if args.json:
            print(json.dumps([{"session": a, **ans} for a, ans in out], indent=2, default=str))
        else:
            print("\n".join(format_session(a, ans) for a, ans in out))
    return status


def _wait_finished(about: dict, scan: str, wait_s: float) -> int:
    from stream.session.ask import ask

    deadline = time.monotonic() + wait_s
    answer = {}
    while time.monotonic() < deadline:
        answer = ask(about["address"], {"op": "list"})
        if not any(h["scan_id"] == scan and h["state"] == "held" for h in answer["held"]):
            path = next((p for sid, p in reversed(answer["written"]) if sid == scan), None)
            moving = next((h for h in answer["held"] if h["scan_id"] == scan), None)
            print(f"{scan}: written to {path or (moving or {}).get('where', '?')}")
            return 0
        time.sleep(0.5)
    err = next((h["error"] for h in answer.get("held", []) if h["scan_id"] == scan), "")
    print(f"{scan}: not written within {wait_s:.0f} s; still held ({err})")
    return 1
