"""Start, watch and stop the processes of a local fleet, leaving nothing behind.

Each process runs in its own session (process group) with its output in a log
file under the run directory; its pid and group are recorded in the run's state
file the moment it starts, so ``kvmarina down`` (or the next ``up``) can stop
whatever an interrupted run left. Stopping sends SIGTERM to the whole group,
waits, then SIGKILLs what is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "fleet.json"


class FleetError(RuntimeError):
    """A part of the fleet failed; the message names it and points at its log."""


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process to run: a name, a command line, and how to tell it is ready."""

    name: str
    role: str  # agent | engine | router
    argv: tuple[str, ...]
    ready_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    node: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    nice: int = 0  # added to the process's CPU niceness (Unix)
    cpus: tuple[int, ...] = ()  # the CPUs it and its children may run on (empty: any)


@dataclass(slots=True)
class Running:
    spec: ProcessSpec
    pid: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, and so the ones it can hand out to what it
    starts (all of them where the platform has no affinity call: macOS)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return sorted(affinity(0)) if affinity else list(range(os.cpu_count() or 1))


def _placed(nice: int, cpus: tuple[int, ...]) -> Callable[[], None] | None:
    """What the child runs before its program: its niceness raised by ``nice`` and
    its CPUs narrowed to ``cpus`` (before it starts a thread or a process, so all of
    them inherit both). Either is skipped where the platform lacks the call."""
    nice = nice if hasattr(os, "nice") else 0
    affinity = getattr(os, "sched_setaffinity", None)
    cpus = cpus if affinity is not None else ()
    if not nice and not cpus:
        return None

    def place() -> None:
        if nice:
            os.nice(nice)
        if cpus and affinity is not None:
            affinity(0, cpus)

    return place


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Supervisor:
    """Owns the processes of one run directory.

    Invariant: every process started is listed in ``<run_dir>/fleet.json``
    before ``start`` returns, so no crash of this process can orphan one silently.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs: list[Running] = []
        self.meta: dict[str, Any] = {}
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ starting

    def start(self, spec: ProcessSpec) -> Running:
        log = self.run_dir / "logs" / f"{spec.name}.log"
        out = log.open("ab")
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        try:
            popen = subprocess.Popen(
                list(spec.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_placed(spec.nice, spec.cpus),
            )
        except OSError as exc:
            raise FleetError(f"{spec.name}: cannot start {spec.argv[0]}: {exc}") from exc
        finally:
            out.close()
        running = Running(spec, popen.pid, log, popen)
        self.procs.append(running)
        self.save()
        return running

    def wait_ready(
        self,
        timeout: float,
        progress: Callable[[int, int, str], None] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        """Poll every process's ready URL; ``FleetError`` naming the first that died
        or did not become ready in time (with the tail of its log)."""
        todo = [
            p for p in self.procs if p.spec.ready_url and (names is None or p.spec.name in names)
        ]
        total, deadline = len(todo), time.monotonic() + timeout
        while todo:
            for proc in list(todo):
                if not proc.alive():
                    raise FleetError(
                        f"{proc.spec.name} exited during start-up; "
                        f"log {proc.log}:\n{tail(proc.log)}"
                    )
                if http_ok(proc.spec.ready_url or ""):
                    todo.remove(proc)
                    if progress:
                        progress(total - len(todo), total, proc.spec.name)
            if todo and time.monotonic() > deadline:
                names_left = ", ".join(p.spec.name for p in todo)
                raise FleetError(
                    f"not ready after {timeout:.0f}s: {names_left}; "
                    f"log {todo[0].log}:\n{tail(todo[0].log)}"
                )
            if todo:
                time.sleep(0.1)

    # ------------------------------------------------------------ stopping

    def stop_all(self, grace: float = 10.0) -> list[str]:
        stopped = stop_processes(self.procs, grace)
        self.procs.clear()
        self.save()
        return stopped

    # ------------------------------------------------------------ state

    def save(self) -> None:
        data = {
            "meta": self.meta,
            "processes": [
                {"spec": asdict(p.spec), "pid": p.pid, "log": str(p.log)} for p in self.procs
            ],
        }
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.run_dir / STATE_FILE)


def load_state(run_dir: Path) -> tuple[dict[str, Any], list[Running]]:
    path = run_dir / STATE_FILE
    if not path.exists():
        return {}, []
    data = json.loads(path.read_text())
    procs = []
    for rec in data.get("processes", []):
        spec = rec["spec"]
        spec["argv"] = tuple(spec["argv"])
        spec["cpus"] = tuple(spec.get("cpus", ()))  # JSON has lists; older files none
        procs.append(Running(ProcessSpec(**spec), int(rec["pid"]), Path(rec["log"])))
    return data.get("meta", {}), procs


def stop_processes(procs: Sequence[Running], grace: float = 10.0) -> list[str]:
    """SIGTERM every process group, wait up to ``grace`` s, SIGKILL the rest.
    Routers first, then engines, then agents (so nothing talks to a dead agent)."""
    order = {"router": 0, "engine": 1, "agent": 2}
    ordered = sorted(procs, key=lambda p: order.get(p.spec.role, 3))
    stopped = []
    for proc in ordered:
        if proc.alive():
            _signal_group(proc.pid, signal.SIGTERM)
            stopped.append(proc.spec.name)
    deadline = time.monotonic() + grace
    for proc in ordered:
        while proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.alive():
            _signal_group(proc.pid, signal.SIGKILL)
        if proc.popen is not None:
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold children of the process: make sure none survive.
        _signal_group(proc.pid, signal.SIGKILL)
    return stopped


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:])


def python_cmd(*args: str) -> tuple[str, ...]:
    """``kvmarina ARGS`` with this interpreter (works without the console script on PATH)."""
    return (sys.executable, "-m", "kvmarina.cli", *args)
