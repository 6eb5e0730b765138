"""The Helm chart, checked with the real helm binary and the Kubernetes schemas."""

from __future__ import annotations

import importlib.util
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
FOREIGN = {"ServiceMonitor", "PrometheusRule", "ClusterKopfPeering", "KopfPeering"}

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
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap", "KopfPeering"} <= kinds
    default_kinds = {o["kind"] for o in render()}
    peerings = {"ClusterKopfPeering", "KopfPeering"}
    assert not {"ServiceMonitor", "PrometheusRule", *peerings} & default_kinds


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
