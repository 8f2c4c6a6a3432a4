"""Wall time, CPU time and peak RSS of one command's whole process tree.

Public tools only: the process is started with ``subprocess``, reaped with ``os.wait4``
(whose ``ru_maxrss`` is the kernel's exact high-water mark of the largest single
process in the tree) while a thread samples every process of the tree through
``psutil`` / ``/proc/PID/status`` every 20 ms and sums their RSS (the tree's peak).
Reported peak RSS is the larger of the two. (``ru_maxrss`` also counts the harness's
own pages at the moment of fork+exec, so the harness never imports torch: it is a
~16 MiB process, which is therefore the floor of every peak RSS reported.)

Other work on the machine skews wall times, so before each measurement the harness
waits (bounded) until the CPUs are idle, and afterwards records how much CPU time
*other* processes used while it ran (``foreign_cpu_frac``: 0 = the machine was ours).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil

HZ = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def busy_fraction(seconds: float = 1.0) -> float:
    b0, t0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, threshold: float = 0.15, log=None) -> float:
    """Wait until less than ``threshold`` of the machine's CPU is busy (or ``max_wait`` s
    have passed); returns the last busy fraction seen."""
    deadline = time.time() + max_wait
    warned = False
    while True:
        frac = busy_fraction(1.0)
        if frac <= threshold or time.time() >= deadline:
            return frac
        if log and not warned:
            log(f"    (machine busy: {100 * frac:.0f}% CPU used by other processes; waiting up to {max_wait:.0f}s)")
            warned = True
        time.sleep(2.0)


def _status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in KiB from /proc/PID/status; (0, 0) once the process is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, anon


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.peak_rss = self.peak_anon = 0  # KiB, sums over the tree
        self.max_procs = 1
        self.timeline: list[tuple[float, int, int]] = []  # (t, rss KiB, anon KiB)
        self.t0 = time.perf_counter()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            pids = [self.pid]
            try:
                pids += [c.pid for c in root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            rss = anon = 0
            for pid in pids:
                r, a = _status_kib(pid)
                rss += r
                anon += a
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            self.max_procs = max(self.max_procs, len(pids))
            self.timeline.append((time.perf_counter() - self.t0, rss, anon))
            self.stop.wait(self.interval)


def run_measured(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, log_path: Path | None = None,
                 interval: float = 0.02) -> dict:
    """Run ``cmd`` to completion and measure it (see the module doc)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        busy0, _ = _cpu_jiffies()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = _Sampler(proc.pid, interval)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy1, _ = _cpu_jiffies()
        sampler.stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path:
            out.close()
    cpu = ru.ru_utime + ru.ru_stime
    foreign = max(0.0, (busy1 - busy0) / HZ - cpu)
    maxrss_kib = ru.ru_maxrss  # Linux: KiB
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mib": round(max(sampler.peak_rss, maxrss_kib) / 1024, 1),
        "peak_rss_anon_mib": round(sampler.peak_anon / 1024, 1),
        "maxrss_single_mib": round(maxrss_kib / 1024, 1),
        "processes": sampler.max_procs,
        "foreign_cpu_frac": round(foreign / max(1e-9, wall * NCPU), 3),
        "timeline": sampler.timeline,
    }
