"""The dashboard and the alert rules query series that the components really export.

A real local fleet (``kvmarina up``'s own start-up: two node agents, two reference
engines on the tiny preset, a router) serves a few chat requests through the router
and one block pull between the nodes; the operator's metrics server runs beside it.
Each ``/metrics`` is scraped over HTTP and parsed with prometheus_client's parser.
Then every selector of every dashboard query and alert expression must name a sample
that was scraped (exactly: ``_total``, ``_bucket`` ... as exposed), every label it
matches or groups by must be on those samples (or be one Prometheus adds to a target),
``rate()`` must read counters and ``histogram_quantile()`` buckets.

Prometheus adds ``job``, ``instance``, ``namespace``, ``pod``, ``container`` and
``endpoint`` to every target of a PodMonitor; a scraped label of the same name is
renamed ``exported_<name>`` (``honorLabels`` is off), which the model below follows.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvmarina.local import up
from kvmarina.local.supervisor import Supervisor
from kvmarina.operator.metrics import serve

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kvmarina"
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})
# the jobs the chart's PodMonitors assign (tests/chart checks the PodMonitors side)
JOBS = frozenset(f"kvmarina-{c}" for c in ("operator", "agent", "engine", "router"))
# rate() over a gauge, where the gauge is a cumulative count: rate() handles its resets
CUMULATIVE_GAUGES = frozenset({"kvmarina_router_events_applied"})
RATE_FUNCTIONS = frozenset({"rate", "irate", "increase"})
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})
PREFIX = "A system prompt that every user of this serving shares, word for word. " * 3


# --------------------------------------------------------------- what was scraped


@dataclass
class Series:
    """The samples of one name across every scrape."""

    kind: str  # the family's type: counter, gauge, histogram, ...
    labels: set[str] = field(default_factory=set)  # as Prometheus stores them
    values: dict[str, set[str]] = field(default_factory=dict)
    total: float = 0.0


def as_stored(label: str) -> str:
    return f"exported_{label}" if label in TARGET_LABELS else label


def index(texts: dict[str, str]) -> dict[str, Series]:
    """Sample name -> what Prometheus would store, from each component's exposition."""
    out: dict[str, Series] = {}
    for text in texts.values():
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                series = out.setdefault(s.name, Series(fam.type))
                for k, v in s.labels.items():
                    series.labels.add(as_stored(k))
                    series.values.setdefault(as_stored(k), set()).add(v)
                series.total += s.value
    out["up"] = Series("gauge", values={"job": set(JOBS)})
    return out


# --------------------------------------------------------------- the expressions


TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*")
    |(?P<range>\[[^\]]*\])
    |(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}]))""",
    re.VERBOSE,
)


def tokens(expr: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expr.rstrip()):
        m = TOKEN.match(expr, pos)
        assert m and m.end() > pos, f"cannot read {expr[pos:]!r} in {expr!r}"
        out.append(m.group(m.lastgroup or "op"))
        pos = m.end()
    return out


@dataclass
class Selector:
    name: str
    at: int
    matchers: list[tuple[str, str, str]]  # label, operator, value


@dataclass
class Parsed:
    selectors: list[Selector]
    groupings: list[tuple[list[str], int, int]]  # labels, the token span they apply to
    calls: list[tuple[str, int, int]]  # function, the span of its arguments


def parse(expr: str) -> Parsed:
    """Enough of PromQL for dashboards and alerts: selectors with matchers, calls,
    ``by``/``without`` before or after the aggregated expression."""
    t = tokens(expr)
    closing, stack = {}, []
    for i, tok in enumerate(t):
        if tok == "(":
            stack.append(i)
        elif tok == ")":
            closing[stack.pop()] = i
    opening = {c: o for o, c in closing.items()}
    out = Parsed([], [], [])
    i = 0
    while i < len(t):
        tok, nxt = t[i], t[i + 1] if i + 1 < len(t) else ""
        if not re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", tok) or tok in KEYWORDS:
            i += 1
        elif tok in GROUPING:
            labels = [x for x in t[i + 2 : closing[i + 1]] if x != ","]
            end = closing[i + 1]
            if t[i - 1] == ")":  # sum (x) by (l)
                span = (opening[i - 1], i - 1)
            elif tok in ("by", "without"):  # sum by (l) (x)
                span = (end + 1, closing[end + 1])
            else:  # vector matching: both sides
                span = (0, len(t))
            out.groupings.append((labels, *span))
            i = end + 1
        elif nxt == "(":
            out.calls.append((tok, i + 1, closing[i + 1]))
            i += 1
        elif nxt in ("by", "without"):  # an aggregation whose grouping comes first
            i += 1
        else:
            matchers = []
            j = i + 1
            if nxt == "{":
                j += 1
                while t[j] != "}":
                    label, op, value = t[j], t[j + 1], t[j + 2]
                    matchers.append((label, op, json.loads(value)))
                    j += 4 if t[j + 3] == "," else 3
                j += 1
            out.selectors.append(Selector(tok, i, matchers))
            i = j
    return out


def problems(expr: str, scraped: dict[str, Series]) -> list[str]:
    p = parse(expr)
    bad = []
    for sel in p.selectors:
        series = scraped.get(sel.name)
        if series is None:
            bad.append(f"{sel.name}: no such series was scraped")
            continue
        for label, op, value in sel.matchers:
            if label not in series.labels | TARGET_LABELS:
                bad.append(f"{sel.name}{{{label}}}: no such label")
            elif op == "=" and label in series.values and value not in series.values[label]:
                bad.append(f"{sel.name}{{{label}={value!r}}}: value never scraped")
    for labels, start, end in p.groupings:
        for sel in p.selectors:
            series = scraped.get(sel.name)
            if series and start <= sel.at <= end:
                missing = set(labels) - series.labels - TARGET_LABELS
                bad += [f"{sel.name}: grouped by {m}, which it lacks" for m in sorted(missing)]
    for func, start, end in p.calls:
        for sel in p.selectors:
            series = scraped.get(sel.name)
            if not series or not start <= sel.at <= end:
                continue
            counts = series.kind in ("counter", "histogram") or sel.name in CUMULATIVE_GAUGES
            if func in RATE_FUNCTIONS and not counts:
                bad.append(f"{func}({sel.name}): a {series.kind}, not a counter")
            if func == "histogram_quantile" and not (
                series.kind == "histogram" and sel.name.endswith("_bucket")
            ):
                bad.append(f"histogram_quantile over {sel.name}, not a histogram's buckets")
    return [f"{b}  [in {expr}]" for b in bad]


def dashboard_exprs() -> list[str]:
    dash = json.loads((CHART / "dashboards" / "kvmarina.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((CHART / "rules" / "kvmarina.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


# --------------------------------------------------------------- the fleet


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


def post(url: str, doc: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(
        url, json.dumps(doc).encode(), {"content-type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@dataclass
class Fleet:
    sup: Supervisor
    scrapes: dict[str, str]  # process name -> its /metrics
    pulled: dict[str, Any]  # the answer of the engine that pulled


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    saved = os.environ.get("KVMARINA_LOG_FORMAT")
    os.environ["KVMARINA_LOG_FORMAT"] = "json"  # the fleet's processes inherit it
    try:
        sup = up.start(
            [str(REPO / "examples" / "local.yaml")],
            2,
            str(tmp_path_factory.mktemp("fleet") / "run"),
            None,
            120,
        )
    finally:
        if saved is None:
            del os.environ["KVMARINA_LOG_FORMAT"]
        else:
            os.environ["KVMARINA_LOG_FORMAT"] = saved
    metrics = serve(0, "127.0.0.1")
    try:
        by_role: dict[str, list[Any]] = {}
        for p in sup.procs:
            by_role.setdefault(p.spec.role, []).append(p.spec)
        (router,) = by_role["router"]
        for turn in ("What is a KV cache?", "And a paged one?"):
            messages = [{"role": "system", "content": PREFIX}, {"role": "user", "content": turn}]
            answer = post(
                router.info["url"] + "/v1/chat/completions",
                {"model": "tiny", "messages": messages, "max_tokens": 3},
            )
            assert answer["choices"][0]["message"]["role"] == "assistant"
        # a prefix computed on one node and pulled by the other's engine, as the router's
        # pull hint asks (the transfer counters have a peer only once a pull happened)
        first, second = sorted(by_role["engine"], key=lambda s: s.node)
        assert first.node != second.node
        agent = {s.node: s.info["url"] for s in by_role["agent"]}
        prompt = PREFIX + "Shared by both nodes."
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        post(first.info["url"] + "/v1/completions", body)
        blocks = (len(prompt) - 1) // 16
        hint = f"node={first.node};agent={agent[first.node]};blocks={blocks}"
        pulled = post(second.info["url"] + "/v1/completions", body, {"x-kvmarina-pull": hint})
        scrapes = {p.spec.name: get(p.spec.info["url"] + "/metrics") for p in sup.procs}
        scrapes["operator"] = get(f"http://127.0.0.1:{metrics.server_port}/metrics")
        yield Fleet(sup, scrapes, pulled)
    finally:
        metrics.shutdown()
        metrics.server_close()
        sup.stop_all()


# --------------------------------------------------------------- the tests


def test_every_dashboard_and_alert_series_is_scraped(fleet: Fleet) -> None:
    roles = {name.split("-")[0] for name in fleet.scrapes}
    assert roles == {"agent", "engine", "router", "operator"}
    scraped = index(fleet.scrapes)
    # the traffic reached every histogram and counter the panels plot
    assert scraped["kvmarina_router_ttft_seconds_count"].total >= 2
    assert scraped["kvmarina_engine_ttft_seconds_count"].total >= 3
    assert scraped["kvmarina_agent_hit_blocks_total"].total > 0
    assert scraped["kvmarina_agent_transfer_bytes_total"].total > 0
    assert scraped["kvmarina_router_events_applied"].total > 0
    cached = fleet.pulled["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0  # the pull was served from the peer
    exprs = dashboard_exprs() + rule_exprs()
    assert len(exprs) > 10
    found = [p for e in exprs for p in problems(e, scraped)]
    assert found == [], "\n".join(found)


def test_every_operator_series_the_rules_use_is_there_before_any_event(fleet: Fleet) -> None:
    """Alerts on the operator's counters must see a series (at zero) before the first
    reconcile, else ``rate()`` over them is empty rather than 0."""
    scraped = index({"operator": fleet.scrapes["operator"]})
    for expr in rule_exprs() + dashboard_exprs():
        if "kvmarina_operator_" in expr:
            assert problems(expr, scraped) == [], expr
    errors = scraped["kvmarina_operator_reconcile_errors_total"]
    assert errors.values["reason"] == {"api", "network", "timeout", "pki", "internal"}


def test_the_checker_refuses_what_prometheus_would_not_find(fleet: Fleet) -> None:
    """The mistakes the old name-grepping test let through, each caught here."""
    scraped = index(fleet.scrapes)
    wrong = {
        # a gauge's name with a counter's suffix: no such series
        "sum(rate(kvmarina_router_events_applied_total[5m]))": "no such series",
        'sum by (tier) (kvmarina_agent_blocks{state="used"})': "no such label",
        "sum by (peer) (kvmarina_agent_pages)": "grouped by peer",
        'kvmarina_router_index_mode{mode="exact"}': "value never scraped",
        "rate(kvmarina_agent_pages[5m])": "not a counter",
        "histogram_quantile(0.9, rate(kvmarina_router_ttft_seconds_count[5m]))": "buckets",
        # the router's own pod label arrives as exported_pod
        "sum by (pod) (kvmarina_router_routed_total)": "",
    }
    for expr, why in wrong.items():
        found = problems(expr, scraped)
        if why:
            assert len(found) == 1 and why in found[0], (expr, found)
        else:
            assert found == [], (expr, found)
    assert "exported_pod" in scraped["kvmarina_router_routed_total"].labels


def test_components_write_json_lines_when_asked(fleet: Fleet) -> None:
    """KVMARINA_LOG_FORMAT=json reached every agent, engine and router: what they log
    is one JSON object a line, and nothing in the text format."""
    text_line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
    seen = set()
    for p in fleet.sup.procs:
        for line in p.log.read_text().splitlines():
            assert not text_line.match(line), (p.spec.name, line)
            if line.startswith("{"):
                doc = json.loads(line)
                assert {"time", "level", "logger", "message"} <= doc.keys(), line
                seen.add(p.spec.role)
    assert {"agent", "engine"} <= seen
