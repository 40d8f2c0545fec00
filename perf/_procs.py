"""The processes of a server under measurement, from /proc: the perf scripts run every server
in a process group of its own (not a session: the machine's autogroup scheduling then treats it
as the rest of the run), so the group names them all."""

from __future__ import annotations

import os


def group_procs(pgid: int) -> dict[int, str]:
    """pid -> process title of every process in process group pgid (the server runs in a
    group of its own, not a session)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        out[int(name)] = title
    return out


def cpu_ticks(pid: int) -> int:
    """User + system CPU pid used so far, in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError):
        return 0


def cpu_seconds(pids: dict[int, str] | list[int]) -> float:
    """User + system CPU seconds the processes used so far (those gone count 0)."""
    return sum(cpu_ticks(pid) for pid in pids) / os.sysconf("SC_CLK_TCK")
