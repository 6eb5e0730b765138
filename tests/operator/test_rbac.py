"""The declared RBAC covers every API call the operator's code makes; no wildcards."""

from __future__ import annotations

from kvmarina.operator.kube import KINDS
from kvmarina.operator.rbac import cluster_rules

# KubeClient method -> verb; every kind in KINDS may be read, listed and applied
USED = {"get": "get", "list": "list", "apply": "patch", "create": "create"}
WRITTEN = {
    "ConfigMap",
    "Secret",
    "Service",
    "DaemonSet",
    "Deployment",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
}


def allowed(resource: str, verb: str) -> bool:
    return any(resource in r["resources"] and verb in r["verbs"] for r in cluster_rules())


def test_every_call_is_allowed() -> None:
    for kind, (plural, _) in KINDS.items():
        assert allowed(plural, "get") and allowed(plural, "list"), kind
        if kind in WRITTEN:
            for verb in ("patch", "create", "delete"):
                assert allowed(plural, verb), (kind, verb)
    assert allowed("kvcachepools/status", "patch") and allowed("modelservings/status", "patch")


def test_no_wildcards() -> None:
    for rule in cluster_rules():
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
