#!/usr/bin/env python3
"""Run a command and fail if any process it started is still running after it exits.

    python scripts/no_leftovers.py [--grace SECONDS] -- COMMAND [ARGS...]

This process makes itself a Linux "child subreaper" (prctl PR_SET_CHILD_SUBREAPER), so
every process the command starts stays our descendant even when its own parent dies
first (an orphaned Ray TrainController, a daemonised server): none can escape to init.
When the command exits we wait up to `--grace` seconds for its descendants to finish
(Ray's processes take a moment after `ray.shutdown()`), then list what is left, stop it
(SIGTERM, then SIGKILL) and exit non-zero. The command's own exit status is kept when it
failed. Standard library only: it runs before and after the virtualenv matters.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
LEFTOVER_EXIT = 3  # the command passed, but it left processes behind


def _become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, command line) from /proc."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its end.
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), fields[0], cmdline or stat.split()[1])
    return table


def descendants(root: int) -> dict[int, str]:
    """Living (non-zombie) descendants of `root`: pid -> command line."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state, _cmd) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        ppid, state, cmd = table[pid]
        if state != "Z":
            found[pid] = cmd
        todo.extend(children.get(pid, []))
    return found


def _reap() -> None:
    # As subreaper we inherit orphans; collect the ones that have exited.
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _stop(pids: list[int]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap()
            if not descendants(os.getpid()):
                return
            time.sleep(0.2)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds to wait for processes to finish after the command")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if not _become_subreaper():
        print("no_leftovers: cannot become a child subreaper; orphaned processes would be "
              "missed, so this check refuses to run", file=sys.stderr)
        return 2

    proc = subprocess.Popen(command)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    rc = proc.wait()

    deadline = time.monotonic() + args.grace
    left = descendants(os.getpid())
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        _reap()
        left = descendants(os.getpid())
    if not left:
        return rc
    print(f"\nno_leftovers: {len(left)} process(es) started by `{' '.join(command)}` were "
          f"still running {args.grace:g} s after it exited (now stopped):", file=sys.stderr)
    for pid, cmd in sorted(left.items()):
        print(f"  pid {pid}: {cmd[:300]}", file=sys.stderr)
    _stop(list(left))
    return rc if rc != 0 else LEFTOVER_EXIT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
