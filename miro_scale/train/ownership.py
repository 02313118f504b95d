"""One owner per run: an owner file in the output directory, and ranks that die with their launcher.

Two jobs writing one output directory corrupt each other's checkpoints (one prunes what the
other's `latest` names). Rank 0 creates output_dir/owner.json exclusively (host, pid, the pid's
start time, when); a second writer is refused with the owner's details. A file left by a dead
process on this host (pid gone, or reused by another process) is stale and taken over; one from
another host cannot be checked from here and is only removed by hand, unless it names this SLURM
job: a requeued job (`#SBATCH --requeue`) restarts on any node after its first allocation ended.

torchrun and the deepspeed launcher start each rank in its own session, so a launcher killed with
SIGKILL leaves its ranks running on. Each rank asks the kernel for SIGKILL when its parent (the
launcher) dies: no step and no checkpoint after the launcher is gone. The `deepspeed` command is two
launchers (the runner starts deepspeed.launcher.launch, which starts the ranks) and the kernel only
watches the parent, so a rank also waits on a pidfd of each launcher above its parent (woken the
moment one exits; polled where pidfds are missing) and ends itself. A thread can only act when it
gets the interpreter, so the checkpoint commit checks the launchers once more (`die_if_orphaned`).
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

OWNER_FILE = "owner.json"
PR_SET_PDEATHSIG = 1
LAUNCHER_COMMANDS = {"torchrun", "deepspeed"}
LAUNCHER_MODULES = {"torch.distributed.run", "deepspeed.launcher.launch", "deepspeed.launcher.runner"}
ANCESTOR_POLL_S = 0.5
_launchers: list = []  # (pid, start time) of this rank's parent and the launchers above it


class RunOwnedError(RuntimeError):
    pass


def _stat(pid: int) -> Optional[list]:
    """/proc/pid/stat from field 3 (state) on; the name in parentheses may hold spaces."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    stat = _stat(pid)
    return None if stat is None else stat[19]  # field 22


def _is_launcher(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    if any(Path(arg).name in LAUNCHER_COMMANDS for arg in argv[:2]):  # `torchrun ...`, `python .../deepspeed ...`
        return True
    return any(a == "-m" and b in LAUNCHER_MODULES for a, b in zip(argv, argv[1:]))


def _alive(owner: dict) -> bool:
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return owner.get("pid_start") is None or _start_time(int(owner["pid"])) == owner["pid_start"]


class RunOwner:
    """Rank 0's claim on an output directory; `release()` when training ends."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / OWNER_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                   "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            owner = self._read()
            if owner is None:  # the other writer is between create and write, or removed it
                time.sleep(0.1)
                continue
            if (owner.get("host"), owner.get("pid")) == (self.me["host"], self.me["pid"]):
                return  # this process already owns it (a second Trainer in one process)
            if not _requeued_from(owner) and (owner.get("host") != self.me["host"] or _alive(owner)):
                where = "" if owner.get("host") == self.me["host"] else " (another host: cannot check it from here)"
                raise RunOwnedError(
                    f"{self.path.parent} (train.output_dir) is in use by pid {owner.get('pid')} on host "
                    f"{owner.get('host')}{where}, started {owner.get('started')}; two runs writing one directory "
                    f"destroy each other's checkpoints. Stop that run or choose another train.output_dir "
                    f"(if that process is gone, delete {self.path})")
            self.path.unlink(missing_ok=True)  # stale: its process is dead, or its allocation ended

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def release(self) -> None:
        owner = self._read()
        if owner is not None and (owner.get("host"), owner.get("pid")) == (self.me["host"], self.me["pid"]):
            self.path.unlink(missing_ok=True)


def _requeued_from(owner: dict) -> bool:
    """The owner is this SLURM job's earlier allocation: SLURM requeues a job only after it ended."""
    job = os.environ.get("SLURM_JOB_ID")
    return job is not None and owner.get("slurm_job_id") == job and owner.get("slurm_restart_count") != \
        os.environ.get("SLURM_RESTART_COUNT")


def die_with_launcher() -> None:
    """Linux: SIGKILL this process when its parent (torchrun, the deepspeed launcher) dies."""
    if not hasattr(os, "getppid") or not Path("/proc/self").exists():
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    above = []  # the launchers above the parent: the deepspeed runner
    pid = _parent_of(parent)
    while pid > 1 and _is_launcher(pid):
        above.append((pid, _start_time(pid)))
        pid = _parent_of(pid)
    _launchers[:] = [(parent, _start_time(parent)), *above]
    if above:
        threading.Thread(target=_die_when_gone, args=(above,), name="launcher-watch", daemon=True).start()


def die_if_orphaned() -> None:
    """SIGKILL this process if a launcher it was started under is gone (a no-op outside one)."""
    if any(_gone(pid, start) for pid, start in _launchers):
        os.kill(os.getpid(), signal.SIGKILL)


def _parent_of(pid: int) -> int:
    stat = _stat(pid)
    return 1 if stat is None else int(stat[1])  # gone: as if reparented to init


def _gone(pid: int, start: Optional[str]) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] == "Z" or stat[19] != start


def _die_when_gone(launchers: list) -> None:
    try:
        fds = [os.pidfd_open(pid) for pid, _ in launchers]  # Linux >= 5.3
    except (AttributeError, OSError):
        fds = []
    die_if_orphaned()  # a pid reused before its pidfd was opened names another process
    if fds:
        waiter = select.poll()
        for fd in fds:
            waiter.register(fd, select.POLLIN)  # readable once the process exits
        waiter.poll()
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        die_if_orphaned()
        time.sleep(ANCESTOR_POLL_S)
