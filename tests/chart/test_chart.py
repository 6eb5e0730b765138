"""The Helm chart, checked with the real helm binary and the Kubernetes schemas."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kvmarina"
ALL_ON = Path(__file__).parent / "all-on.yaml"
K8S_VERSION = "1.30.0"
# Kinds of other projects' CRDs: no offline schema exists; checked structurally below.
FOREIGN = {"PodMonitor", "PrometheusRule", "ClusterKopfPeering", "KopfPeering"}

HELM = shutil.which("helm")
pytestmark = pytest.mark.skipif(HELM is None, reason="helm is not on PATH (make test installs it)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert HELM
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check, timeout=120)


def render(*extra: str) -> list[dict[str, Any]]:
    out = helm("template", "kv", str(CHART), "--namespace", "kvmarina-system", *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _sync_module() -> Any:
    spec = importlib.util.spec_from_file_location("sync_chart", REPO / "scripts" / "sync_chart.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_ON)]], ids=["defaults", "all-on"])
def test_helm_lint_strict(values: list[str]) -> None:
    res = helm("lint", "--strict", str(CHART), *values, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_ON)]], ids=["defaults", "all-on"])
def test_rendered_objects_validate_against_kubernetes(values: list[str]) -> None:
    objs = render(*values)
    assert objs
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "kvmarina", obj["metadata"]["name"]
        if obj["kind"] in FOREIGN:
            assert obj["apiVersion"] and obj["metadata"]["name"]
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_all_toggles_render_their_objects() -> None:
    kinds = {o["kind"] for o in render("-f", str(ALL_ON))}
    # all-on watches namespaces: its 2 replicas elect a leader through KopfPeerings
    assert {"PodMonitor", "PrometheusRule", "ConfigMap", "KopfPeering"} <= kinds
    default_kinds = {o["kind"] for o in render()}
    peerings = {"ClusterKopfPeering", "KopfPeering"}
    assert not {"PodMonitor", "PrometheusRule", *peerings} & default_kinds


def test_crds_in_the_chart_are_those_of_crds_folder() -> None:
    crds = [o for o in render() if o["kind"] == "CustomResourceDefinition"]
    rendered = {o["metadata"]["name"]: o for o in crds}
    on_disk = {}
    for path in (REPO / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        on_disk[crd["metadata"]["name"]] = crd
    assert set(rendered) == set(on_disk)
    for name, crd in on_disk.items():
        got = rendered[name]
        assert got["spec"] == crd["spec"]
        assert got["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crd_toggles() -> None:
    off = render("--set", "crds.enabled=false")
    assert not [o for o in off if o["kind"] == "CustomResourceDefinition"]
    not_kept = render("--set", "crds.keep=false")
    crds = [o for o in not_kept if o["kind"] == "CustomResourceDefinition"]
    assert crds and all("annotations" not in c["metadata"] for c in crds)


def test_generated_chart_files_are_current() -> None:
    assert _sync_module().stale_files() == [], "run: python scripts/sync_chart.py"


def test_operator_pod_is_locked_down() -> None:
    dep = next(o for o in render() if o["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    ctr = pod["containers"][0]
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert ctr["livenessProbe"] and ctr["readinessProbe"]


def test_peering_follows_replicas() -> None:
    def peering(objs: list[dict[str, Any]]) -> str:
        dep = next(o for o in objs if o["kind"] == "Deployment")
        container = dep["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        return str(env["KVMARINA_OPERATOR_PEERING"])

    assert peering(render()) == ""
    two = render("--set", "operator.replicas=2")
    assert peering(two) == "kv-kvmarina"
    # kopf looks for a ClusterKopfPeering of that name when it watches the cluster
    (obj,) = [o for o in two if o["kind"] == "ClusterKopfPeering"]
    assert obj["metadata"]["name"] == "kv-kvmarina"
    crd = next(o for o in two if o["metadata"]["name"] == "clusterkopfpeerings.kopf.dev")
    assert crd["spec"]["scope"] == "Cluster"


def test_peering_is_per_namespace_when_namespaces_are_watched() -> None:
    objs = render("--set", "operator.replicas=2", "--set", "operator.watchNamespaces={a,b}")
    # kopf watching namespaces looks for a KopfPeering in each; a missing one pauses it
    peerings = [o for o in objs if o["kind"] == "KopfPeering"]
    assert sorted(o["metadata"]["namespace"] for o in peerings) == ["a", "b"]
    assert {o["metadata"]["name"] for o in peerings} == {"kv-kvmarina"}
    assert not [o for o in objs if o["kind"] == "ClusterKopfPeering"]
    crd = next(o for o in objs if o["metadata"]["name"] == "kopfpeerings.kopf.dev")
    assert crd["spec"]["scope"] == "Namespaced"
    for o in objs:
        if o["kind"] == "CustomResourceDefinition":
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)


@pytest.mark.parametrize("extra", [[], ["--set", "nameOverride=kv-op"]], ids=["default", "renamed"])
def test_operator_pods_carry_the_labels_the_network_policies_select(extra: list[str]) -> None:
    """Agents' and engines' NetworkPolicies let the operator's pods (naming.OPERATOR_SELECTOR)
    read /stats and /metrics; the chart's pods must match it whatever the chart's name."""
    from kvmarina.operator.naming import OPERATOR_SELECTOR

    dep = next(o for o in render(*extra) if o["kind"] == "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert OPERATOR_SELECTOR.items() <= labels.items(), labels
    assert labels["app.kubernetes.io/component"] == "operator"
    if not extra:
        assert labels["app.kubernetes.io/name"] == "kvmarina"


def test_the_operator_image_has_the_openssl_cli() -> None:
    """pki.py makes a pool's mTLS CA and certificate with the openssl CLI: the image
    the chart runs the operator from (the slim target) must install it."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["image"]["repository"].endswith("-slim")
    stages = (REPO / "Dockerfile").read_text().split("\nFROM ")
    (slim,) = [s for s in stages if s.split("\n", 1)[0].endswith(" AS slim")]
    installs = [ln for ln in slim.splitlines() if "apt-get install" in ln]
    assert installs and "openssl" in installs[0].split(), installs


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "operator.replicaz=2"], "replicaz"),
        (["--set", "crds.enabled=yes"], "enabled"),
        (["--set", "operator.logLevel=loud"], "logLevel"),
        (["--set", "operator.logFormat=xml"], "logFormat"),
        (["--set", "metrics.monitoringNamespaces={Not_A_Namespace}"], "monitoringNamespaces"),
        (["--set", "operator.metricsPort=8080"], "metricsPort"),
        (["--set", "bogus=1"], "bogus"),
    ],
)
def test_invalid_values_fail_naming_the_key(args: list[str], key: str) -> None:
    res = helm("template", "kv", str(CHART), *args, check=False)
    assert res.returncode != 0
    assert key in res.stderr, res.stderr


def test_vllm_images_reach_the_vllm_pods_the_operator_plans() -> None:
    """images.vllm / images.vllmCpu -> the operator's environment -> a vLLM serving's pod."""
    from kvmarina.operator.components import Endpoint
    from kvmarina.operator.plan_serving import plan_serving
    from kvmarina.operator.settings import Settings
    from kvmarina.validate import parse_resource

    objs = render(
        "--set", "images.vllm.repository=example.org/vllm", "--set", "images.vllm.tag=v9",
        "--set", "images.vllmCpu.repository=example.org/vllm-cpu",
    )  # fmt: skip
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    env = {
        e["name"]: e.get("value", "")
        for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    settings = Settings.from_env(env)
    docs = [
        parse_resource(d)
        for d in yaml.safe_load_all((REPO / "examples/vllm-local.yaml").read_text())
    ]
    pool, serving = docs
    gpu_pool = parse_resource(yaml.safe_load((REPO / "examples/pool.yaml").read_text()))
    images = {}
    for p in (pool, gpu_pool):
        plan = plan_serving(serving, "u", p, settings, "t", [Endpoint("e", "http://e", "n", None)])
        engine = next(
            m for m in plan if m["kind"] == "Deployment" and "engine" in m["metadata"]["name"]
        )
        images[p.spec.memory.backend] = engine["spec"]["template"]["spec"]["containers"][0]["image"]
    assert images == {"cuda": "example.org/vllm:v9", "cpu": "example.org/vllm-cpu:v0.32.0"}


# ------------------------------------------------------------------- monitoring

RULES = CHART / "rules" / "kvmarina.yaml"


def operator_env(objs: list[dict[str, Any]]) -> dict[str, str]:
    """The operator container's environment as the kubelet would set it (the pod's own
    namespace resolved to the release's)."""
    dep = next(o for o in objs if o["kind"] == "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for e in container["env"]:
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = (
            dep["metadata"]["namespace"] if field == "metadata.namespace" else e.get("value", "")
        )
    return env


def pod_monitors(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rendered PodMonitors by the component they scrape."""
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o
        for o in objs
        if o["kind"] == "PodMonitor"
    }


def job_of(monitor: dict[str, Any]) -> str:
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    assert "sourceLabels" not in relabel and relabel["action"] == "replace"
    return str(relabel["replacement"])


def scrapes(monitor: dict[str, Any], pod: dict[str, Any], namespace: str) -> bool:
    """Whether the PodMonitor selects this pod template (labels, namespace) and the pod
    has a container port of the endpoint's name."""
    spec = monitor["spec"]
    sel = spec["selector"]["matchLabels"]
    ns_sel = spec["namespaceSelector"]
    in_ns = ns_sel.get("any") is True or namespace in ns_sel.get("matchNames", [])
    (endpoint,) = spec["podMetricsEndpoints"]
    ports = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports") or []}
    return in_ns and sel.items() <= pod["metadata"]["labels"].items() and endpoint["port"] in ports


def planned_pods(settings: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(component, namespace, pod template) of every pod the operator plans for the
    examples: the CUDA pool's agents, the reference and the vLLM servings' engines and
    routers."""
    from kvmarina.operator.components import Endpoint
    from kvmarina.operator.plan_pool import plan_pool
    from kvmarina.operator.plan_serving import plan_serving
    from kvmarina.validate import parse_resource

    def example(name: str) -> list[Any]:
        return [
            parse_resource(d) for d in yaml.safe_load_all((REPO / "examples" / name).read_text())
        ]

    (pool,) = example("pool.yaml")
    (serving,) = example("serving.yaml")
    vllm_pool, vllm = example("vllm-local.yaml")
    pods = [Endpoint("e", "http://10.0.0.1:8000", "n", None)]
    manifests = plan_pool(pool, "u", settings, {"token": "t"})
    manifests += plan_serving(serving, "u", pool, settings, "t", pods)
    manifests += plan_serving(vllm, "u", vllm_pool, settings, "t", pods)
    out = []
    for m in manifests:
        if m["kind"] in ("Deployment", "DaemonSet"):
            pod = m["spec"]["template"]
            component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
            out.append((component, m["metadata"]["namespace"], pod))
    return out


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_ON)]], ids=["any-namespace", "watched"])
def test_pod_monitors_scrape_every_pod_the_operator_plans(values: list[str]) -> None:
    """Each component's PodMonitor selects the pods the operator plans for it, on a
    port those pods have (agents: metrics, engines and routers: http), and nothing of
    another component's; the operator's own PodMonitor selects the chart's pod."""
    from kvmarina.operator.settings import Settings

    objs = render("--set", "metrics.serviceMonitor.enabled=true", *values)
    monitors = pod_monitors(objs)
    assert set(monitors) == {"operator", "agent", "engine", "router"}
    env = operator_env(objs)
    settings = Settings.from_env(env)
    pods = planned_pods(settings)
    assert {c for c, _, _ in pods} == {"agent", "engine", "router"}
    for component, namespace, pod in pods:
        if settings.watch_namespaces and component != "agent":
            namespace = settings.watch_namespaces[0]  # a serving the operator watches
        chosen = [c for c, m in monitors.items() if scrapes(m, pod, namespace)]
        assert chosen == [component], (component, pod["metadata"]["labels"])
    dep = next(o for o in objs if o["kind"] == "Deployment")
    op_pod = dep["spec"]["template"]
    assert [c for c, m in monitors.items() if scrapes(m, op_pod, "kvmarina-system")] == ["operator"]
    (metrics_port,) = [
        p for p in op_pod["spec"]["containers"][0]["ports"] if p["name"] == "metrics"
    ]
    assert str(metrics_port["containerPort"]) == env["KVMARINA_METRICS_PORT"] == "8081"
    for component, monitor in monitors.items():
        assert job_of(monitor) == f"kvmarina-{component}"
        if values:  # all-on's metrics.serviceMonitor.labels: what Prometheus selects on
            assert monitor["metadata"]["labels"]["release"] == "prometheus"
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"


def test_operator_metrics_port_is_in_the_service_and_differs_from_health() -> None:
    objs = render("--set", "operator.metricsPort=9100")
    svc = next(o for o in objs if o["kind"] == "Service")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"health": 8080, "metrics": 9100}
    assert operator_env(objs)["KVMARINA_METRICS_PORT"] == "9100"
    clash = helm("template", "kv", str(CHART), "--set", "operator.metricsPort=8080", check=False)
    assert clash.returncode != 0 and "must differ" in clash.stderr


def test_monitoring_namespaces_reach_the_operator_and_its_network_policies() -> None:
    """metrics.monitoringNamespaces -> KVMARINA_MONITORING_NAMESPACES -> the operator's
    settings -> the agents' NetworkPolicy admits Prometheus' namespace to /metrics."""
    from kvmarina.operator.netpol import NAMESPACE_LABEL
    from kvmarina.operator.settings import Settings

    assert operator_env(render())["KVMARINA_MONITORING_NAMESPACES"] == ""
    env = operator_env(render("--set", "metrics.monitoringNamespaces={monitoring,obs}"))
    assert env["KVMARINA_MONITORING_NAMESPACES"] == "monitoring,obs"
    settings = Settings.from_env(env)
    assert settings.monitoring_namespaces == ("monitoring", "obs")
    agent = next(p for c, _, p in planned_pods(settings) if c == "agent")
    (metrics_port,) = [
        p["containerPort"]
        for c in agent["spec"]["containers"]
        for p in c.get("ports") or []
        if p["name"] == "metrics"
    ]
    from kvmarina.operator.plan_pool import plan_pool
    from kvmarina.validate import parse_resource

    pool = parse_resource(yaml.safe_load((REPO / "examples" / "pool.yaml").read_text()))
    (policy,) = [
        m for m in plan_pool(pool, "u", settings, {"token": "t"}) if m["kind"] == "NetworkPolicy"
    ]
    admitted = [
        peer["namespaceSelector"]["matchExpressions"][0]["values"]
        for rule in policy["spec"]["ingress"]
        if {"port": metrics_port} in rule["ports"]
        for peer in rule["from"]
        if "matchExpressions" in peer.get("namespaceSelector", {})
        and peer["namespaceSelector"]["matchExpressions"][0]["key"] == NAMESPACE_LABEL
    ]
    assert admitted == [["monitoring", "obs"]]


@pytest.mark.parametrize(
    ("values", "level", "fmt"),
    [
        ([], "info", "text"),
        (["--set", "operator.logLevel=debug", "--set", "operator.logFormat=json"], "debug", "json"),
    ],
)
def test_operator_log_settings_reach_the_operator(values: list[str], level: str, fmt: str) -> None:
    """The chart's environment is what ``kvmarina operator`` reads (no flags in the pod)."""
    from kvmarina.operator.main import parse_args

    objs = render(*values)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"] == ["kvmarina", "operator"]
    args = parse_args([], operator_env(objs))
    assert (args.log_level, args.log_format, args.metrics_port) == (level, fmt, 8081)


def test_prometheus_rule_is_the_rule_file_and_names_the_pod_monitors_jobs() -> None:
    """The PrometheusRule carries rules/kvmarina.yaml verbatim ({{ $labels }} untouched
    by helm); every job an alert selects is one a PodMonitor assigns."""
    objs = render("-f", str(ALL_ON))
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    jobs = {job_of(m) for m in pod_monitors(objs).values()}
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert alerts and all({"alert", "expr", "for", "annotations"} <= r.keys() for r in alerts)
    used = {j for r in alerts for j in re.findall(r'job="([^"]+)"', r["expr"])}
    assert used and used <= jobs, used - jobs
    assert any("{{ $labels." in r["annotations"]["summary"] for r in alerts)


def test_component_log_format_reaches_every_kvmarina_container() -> None:
    """defaults.componentLogFormat -> the operator's settings -> KVMARINA_LOG_FORMAT of
    the agents, reference engines and routers it plans (vLLM logs its own way)."""
    from kvmarina.operator.settings import Settings

    env = operator_env(render("--set", "defaults.componentLogFormat=json"))
    settings = Settings.from_env(env)
    seen = set()
    for component, _, pod in planned_pods(settings):
        for c in pod["spec"]["containers"]:
            if "vllm" in c["image"]:
                continue
            values = {e["name"]: e.get("value") for e in c.get("env") or []}
            assert values.get("KVMARINA_LOG_FORMAT") == "json", (component, c["name"])
            seen.add(component)
    assert seen == {"agent", "engine", "router"}
