"""What an engine says about its own load, read from its ``/metrics``.

A router sees only the requests it sent itself; replicas of the router (and any client
that bypasses it) load the same engines. Engines that report their load let every
replica see all of it:

* kvmarina's engine: ``kvmarina_engine_running`` / ``kvmarina_engine_waiting``;
* vLLM: ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` (one sample per
  model, summed);
* the simulated engine: ``kvmarina_sim_requests_running`` / ``..._waiting``.

``running`` counts sequences the engine has scheduled (decoding, or prefilling now),
``waiting`` those queued for their prefill.

Polled figures are a second old; an engine of ours also sends its load on every
response (``kvmarina.load_report``), and pushes it as it changes through its node
agent's event stream (``kvmarina.events.LoadRecord``), which every replica follows:
a replica learns of the others' requests within milliseconds.
"""

from __future__ import annotations

from kvmarina.load_report import EngineLoad

RUNNING = ("kvmarina_engine_running", "vllm:num_requests_running", "kvmarina_sim_requests_running")
WAITING = ("kvmarina_engine_waiting", "vllm:num_requests_waiting", "kvmarina_sim_requests_waiting")


def parse_load(text: str) -> EngineLoad | None:
    """The load in a Prometheus text exposition; ``None`` when the engine reports none."""
    running = waiting = 0.0
    found = False
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, rest = line.partition(" ")
        base = name.partition("{")[0]
        if base not in RUNNING and base not in WAITING:
            continue
        if "{" in name and "}" not in name:  # a label value with a space: find its end
            name, _, rest = line.partition("} ")
            base = name.partition("{")[0]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        found = True
        if base in RUNNING:
            running += value
        else:
            waiting += value
    return EngineLoad(int(running), int(waiting)) if found else None
