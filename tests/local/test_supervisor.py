"""The local supervisor: real processes, readiness, and nothing left behind."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmarina.local.ports import LOWEST, PortInUse, check_free, ephemeral_range, free_ports
from kvmarina.local.supervisor import (
    FleetError,
    ProcessSpec,
    Supervisor,
    load_state,
    stop_processes,
)

# A server that also forks a child, to prove the whole process group is stopped.
SERVER = """
import http.server, os, sys, time
if os.fork() == 0:
    time.sleep(600)
    sys.exit(0)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_start_ready_stop_leaves_nothing(
    tmp_path: Path, process_group: Callable[[int], list[int]]
) -> None:
    sup = Supervisor(tmp_path)
    ports = free_ports(2)
    for i, port in enumerate(ports):
        sup.start(
            ProcessSpec(
                f"srv{i}",
                "engine",
                (sys.executable, "-c", SERVER, str(port)),
                ready_url=f"http://127.0.0.1:{port}/",
            )
        )
    seen: list[str] = []
    sup.wait_ready(30, lambda done, total, name: seen.append(name))
    assert sorted(seen) == ["srv0", "srv1"]
    groups = [p.pid for p in sup.procs]
    assert all(len(process_group(g)) >= 2 for g in groups)  # server + its forked child
    _, recorded = load_state(tmp_path)
    assert sorted(r.pid for r in recorded) == sorted(groups)
    sup.stop_all(grace=5)
    assert not any(process_group(g) for g in groups)
    assert load_state(tmp_path)[1] == []


def test_state_file_lets_another_process_stop_the_fleet(
    tmp_path: Path, process_group: Callable[[int], list[int]]
) -> None:
    sup = Supervisor(tmp_path)
    (port,) = free_ports(1)
    sup.start(
        ProcessSpec(
            "srv",
            "router",
            (sys.executable, "-c", SERVER, str(port)),
            ready_url=f"http://127.0.0.1:{port}/",
        )
    )
    sup.wait_ready(30)
    _, procs = load_state(tmp_path)  # as `kvmarina down` sees it
    stop_processes(procs, grace=5)
    assert not process_group(procs[0].pid)


def test_a_part_that_dies_is_named_with_its_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    sup.start(
        ProcessSpec(
            "agent-node-0",
            "agent",
            (sys.executable, "-c", "import sys; print('boom: no socket dir'); sys.exit(3)"),
            ready_url="http://127.0.0.1:1/",
        )
    )
    with pytest.raises(FleetError, match="agent-node-0 exited during start-up") as info:
        sup.wait_ready(20)
    assert "boom: no socket dir" in str(info.value)
    sup.stop_all()


def test_a_niced_part_and_every_thread_it_starts_run_at_its_niceness(tmp_path: Path) -> None:
    """Local mode runs engines niced below the router and the agents (``share_cores``):
    the niceness is set before the program runs, so threads it starts later (vLLM's
    and torch's compute threads) have it too."""
    sup = Supervisor(tmp_path)
    script = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start()"
    running = sup.start(ProcessSpec("engine-0", "engine", (sys.executable, "-c", script), nice=5))
    try:
        tasks = Path(f"/proc/{running.pid}/task")
        deadline = time.monotonic() + 20
        while len(list(tasks.iterdir())) < 2:
            assert time.monotonic() < deadline, "the child never started its thread"
            time.sleep(0.05)
        base = os.getpriority(os.PRIO_PROCESS, 0)
        for task in tasks.iterdir():  # field 19 of a task's stat: its niceness
            assert int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]) == base + 5
    finally:
        sup.stop_all(grace=5)


def test_ports_are_distinct_and_taken_ports_explained() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(PortInUse, match="for router is already in use"):
            check_free(s.getsockname()[1], "router")


def test_planned_ports_stay_out_of_the_kernels_ephemeral_range() -> None:
    """A port planned for a process that starts later cannot be taken meanwhile by
    the source port of an outgoing connection (the kernel picks those from its
    ephemeral range): CI once lost a demo to exactly that."""
    ports = free_ports(12)
    assert len(set(ports)) == 12
    span = ephemeral_range()
    if span is None:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range on this system")
    assert all(LOWEST <= p < span[0] for p in ports), (ports, span)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity call here")
def test_a_process_and_its_children_run_on_the_cpus_and_niceness_given(tmp_path: Path) -> None:
    """What ``bind_cores`` gives a vLLM engine (its API server and the engine core it
    spawns) and ``share_cores`` every engine, as the child sees it from inside."""
    core = sorted(os.sched_getaffinity(0))[-1]
    report = (
        "import os, sys\n"
        "who = 'child' if os.fork() == 0 else 'parent'\n"
        "print(who, sorted(os.sched_getaffinity(0)), os.nice(0), flush=True)\n"
        "os._exit(0) if who == 'child' else os.wait()\n"
    )
    sup = Supervisor(tmp_path)
    running = sup.start(
        ProcessSpec("e0", "engine", (sys.executable, "-c", report), nice=3, cpus=(core,))
    )
    assert running.popen is not None and running.popen.wait(30) == 0
    lines = sorted(running.log.read_text().split("\n")[:2])
    base = os.nice(0)
    assert lines == [f"child [{core}] {base + 3}", f"parent [{core}] {base + 3}"]
    assert load_state(tmp_path)[1][0].spec.cpus == (core,)  # as `kvmarina down` reads it
