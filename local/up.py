"""``kvmarina up -f FILE [--nodes N]``: run KVCachePool/ModelServing YAML as local processes.

Stays in the foreground; Ctrl-C (or ``kvmarina down`` from another terminal) stops
everything. Nothing is started when the YAML does not validate, and a part that
fails to start stops everything already started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvmarina.local.fleet import FleetPlan, load_resources, plan_fleet
from kvmarina.local.progress import Progress
from kvmarina.local.rundir import run_dir
from kvmarina.local.supervisor import FleetError, Supervisor, load_state, pid_alive, stop_processes
from kvmarina.operator.components import PlanError
from kvmarina.validate import SpecError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvmarina up", description=__doc__.splitlines()[0])
    p.add_argument("-f", "--file", dest="files", action="append", required=True, metavar="FILE")
    p.add_argument("--nodes", type=int, default=2, help="simulated nodes per pool (2)")
    p.add_argument("--run-dir", help="where configs, logs and state go (./.kvmarina)")
    p.add_argument("--model-dir", help="weights directory for servings without a preset")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for readiness")
    return p.parse_args(argv)


#: Start-ups tried when a process finds its planned port taken: ports are chosen
#: free at planning time, and another program on the machine may bind one before
#: the process that was to use it does (seen on shared CI hosts).
START_ATTEMPTS = 3


def start(
    files: list[str], nodes: int, rdir_arg: str | None, model_dir: str | None, timeout: float
) -> Supervisor:
    """Validate, plan, start and wait; stops what it started on any failure, and
    starts again with fresh ports if a planned port was taken meanwhile."""
    if nodes < 1:
        raise FleetError("--nodes must be at least 1")
    pools, servings = load_resources(files)
    rdir = run_dir(rdir_arg)
    _, leftover = load_state(rdir)
    if any(p.alive() for p in leftover):
        raise FleetError(f"a fleet is already running from {rdir}; run `kvmarina down` first")
    attempt = 0
    while True:
        attempt += 1
        shutil.rmtree(rdir, ignore_errors=True)
        rdir.mkdir(parents=True)
        plan = plan_fleet(pools, servings, rdir, nodes, model_dir)
        try:
            return _start_plan(plan, rdir, files, timeout)
        except FleetError as exc:
            bind = [ln for ln in str(exc).splitlines() if "address already in use" in ln]
            if not bind or attempt == START_ATTEMPTS:
                raise
            part = str(exc).split(" exited", 1)[0]
            print(
                f"{part}: a planned port was taken meanwhile ({bind[-1].strip()}); "
                "starting again with other ports",
                file=sys.stderr,
            )


def _start_plan(plan: FleetPlan, rdir: Path, files: list[str], timeout: float) -> Supervisor:
    sup = Supervisor(rdir)
    sup.meta = {"up_pid": os.getpid(), "files": files, "started": time.time()}
    bar = Progress("starting", len(plan.all))
    try:
        done = 0
        for group in (plan.agents, plan.engines, plan.routers):
            for spec in group:
                sup.start(spec)
            sup.wait_ready(timeout, _ticker(bar, done), [s.name for s in group])
            done += len(group)
    except BaseException:
        sup.stop_all()
        raise
    return sup


def _ticker(bar: Progress, offset: int) -> Callable[[int, int, str], None]:
    def tick(n: int, total: int, name: str) -> None:
        bar.update(offset + n, f"{name} ready")

    return tick


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        sup = start(args.files, args.nodes, args.run_dir, args.model_dir, args.timeout)
    except SpecError as exc:
        for issue in exc.issues:
            print(f"{issue}", file=sys.stderr)
        print("nothing was started", file=sys.stderr)
        return 1
    except (FleetError, PlanError, OSError) as exc:
        print(f"kvmarina up: {exc}", file=sys.stderr)
        print("everything that had started was stopped", file=sys.stderr)
        return 1
    stop = {"sig": 0}

    def on_signal(sig: int, _frame: object) -> None:
        stop["sig"] = sig

    # Handlers first, then tell the user: a Ctrl-C right after the URL is printed
    # must still stop the fleet.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        for p in sup.procs:
            if p.spec.role == "router":
                print(
                    f"router for {p.spec.info['serving']}: {p.spec.info['url']}  "
                    f"(model {p.spec.info['model']!r})"
                )
        print(
            f"logs: {sup.run_dir / 'logs'}; `kvmarina status` for a table; Ctrl-C or "
            "`kvmarina down` to stop",
            flush=True,
        )
        while not stop["sig"]:
            dead = [p for p in sup.procs if not p.alive()]
            if dead:
                print(
                    f"kvmarina up: {dead[0].spec.name} exited; stopping the fleet "
                    f"(log {dead[0].log})",
                    file=sys.stderr,
                )
                break
            time.sleep(0.5)
    finally:
        stopped = sup.stop_all()
        print(f"stopped {len(stopped)} processes", file=sys.stderr)
    return 0


def down(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvmarina down", description="Stop a local fleet.")
    p.add_argument("--run-dir")
    args = p.parse_args(argv)
    rdir = run_dir(args.run_dir)
    meta, procs = load_state(rdir)
    up_pid = int(meta.get("up_pid", 0) or 0)
    if up_pid and pid_alive(up_pid) and up_pid != os.getpid():
        os.kill(up_pid, signal.SIGTERM)  # `up` stops its fleet and exits
        deadline = time.monotonic() + 20
        while pid_alive(up_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    stopped = stop_processes(procs, grace=10)  # whatever an interrupted `up` left
    alive = [p.spec.name for p in procs if p.alive()]
    if alive:
        print(f"kvmarina down: still running: {', '.join(alive)}", file=sys.stderr)
        return 1
    print(f"fleet in {rdir} stopped" + (f" ({len(stopped)} leftover processes)" if stopped else ""))
    return 0
