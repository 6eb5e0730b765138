"""``kvmarina status``: a table of the local fleet's nodes, agents, engines and routers."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from kvmarina.agent_stats import AgentStats, StatsError
from kvmarina.local.rundir import run_dir
from kvmarina.local.supervisor import load_state


def fetch(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            data = json.loads(r.read())
            return data if isinstance(data, dict) else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def agent_row(name: str, node: str, url: str) -> list[str]:
    doc = fetch(url + "/stats")
    try:
        s = AgentStats.from_wire(doc)
    except StatsError:
        return [name, node, "down" if doc is None else "bad /stats", "-", "-", "-"]
    dev, host = s.pages["device"], s.pages["host"]
    rate = f"{s.hit_blocks / s.asked_blocks:.0%}" if s.asked_blocks else "-"
    blocks = s.blocks["device"] + s.blocks["host"]
    tiers = f"dev {dev.used}/{dev.total} host {host.used}/{host.total}"
    return [name, node, tiers, str(blocks), rate, str(s.sessions)]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvmarina status", description="Show the local fleet.")
    p.add_argument("--run-dir")
    args = p.parse_args(argv)
    rdir = run_dir(args.run_dir)
    _, procs = load_state(rdir)
    if not procs:
        print(f"no fleet running from {rdir} (start one with `kvmarina up -f FILE`)")
        return 1
    agents = [
        agent_row(p.spec.name, p.spec.node, p.spec.info["url"])
        for p in procs
        if p.spec.role == "agent"
    ]
    print(table(agents, ["AGENT", "NODE", "PAGES USED", "BLOCKS", "HIT RATE", "ENGINES"]))
    print()
    others = []
    for proc in procs:
        if proc.spec.role == "agent":
            continue
        health = fetch(proc.spec.info["url"] + "/health")
        state = "up" if health is not None else ("running" if proc.alive() else "down")
        detail = ""
        if proc.spec.role == "router" and health:
            detail = str(health.get("index_mode", health.get("mode", "")))
        others.append(
            [
                proc.spec.name,
                proc.spec.role,
                proc.spec.node or "-",
                state,
                proc.spec.info["url"],
                detail,
            ]
        )
    print(table(others, ["NAME", "ROLE", "NODE", "STATE", "URL", "INDEX"]))
    return 0
