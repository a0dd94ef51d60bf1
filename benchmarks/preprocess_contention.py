"""What else used the CPU during a timed pass: the shared CPU lock, the load average, and the
CPU time of processes outside the benchmark (bench_preprocess.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path


@contextlib.contextmanager
def cpu_lock(path: Path, exclusive: bool, wait_s: float):
    """``flock`` on the shared CPU lock file; exclusive around timings, shared around heavy work."""
    path.touch(exist_ok=True)
    with open(path) as handle:
        deadline = time.monotonic() + wait_s
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"could not take the {'exclusive' if exclusive else 'shared'} lock {path} in {wait_s:.0f} s"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far) for every process /proc shows."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


class ForeignCpu:
    """CPU seconds used by processes that are not this benchmark or its descendants, sampled
    from /proc every 0.25 s while a timed part runs: the contention a load average only hints at.
    (Processes born and gone between two samples are missed; on this machine that is noise.)"""

    def __init__(self) -> None:
        import threading

        self.me = os.getpid()
        self.foreign = 0.0
        self.steal = 0.0  # CPU time the hypervisor gave to other guests (all cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _mine(self, pid: int, table: dict) -> bool:
        seen = 0
        while pid in table and seen < 64:
            if pid == self.me:
                return True
            pid, seen = table[pid][0], seen + 1
        return False

    def _run(self) -> None:
        previous = _process_table()
        while not self._stop.wait(0.25):
            current = _process_table()
            for pid, (_, cpu) in current.items():
                if pid in previous and not self._mine(pid, current):
                    self.foreign += max(0.0, cpu - previous[pid][1])
            previous = current

    @staticmethod
    def _steal() -> float:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0

    def __enter__(self) -> "ForeignCpu":
        self._steal0 = self._steal()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.steal = self._steal() - self._steal0


def contaminated(foreign_cpu_s: float, seconds: float) -> bool:
    """Whether a pass of ``seconds`` was disturbed by ``foreign_cpu_s`` of other processes' CPU time."""
    # Processes that ignore the lock (on a shared machine) used more than 5% of the cores.
    return foreign_cpu_s > max(3.0, 0.05 * seconds * (os.cpu_count() or 1))
