"""The exact Kubernetes API access the operator uses: rendered into the chart's ClusterRole.

Every verb here is used by ``kvmarina.operator.kube`` or by kopf itself (watching
the two CRs, its finalizers, peering, events); nothing is a wildcard.
"""

from __future__ import annotations

from typing import Any

MANAGE = ["get", "list", "watch", "create", "patch", "update", "delete"]


def cluster_rules() -> list[dict[str, Any]]:
    return [
        {
            "apiGroups": ["kvmarina.io"],
            "resources": ["kvcachepools", "modelservings"],
            "verbs": ["get", "list", "watch", "patch", "update"],
        },
        {
            "apiGroups": ["kvmarina.io"],
            "resources": ["kvcachepools/status", "modelservings/status"],
            "verbs": ["get", "patch", "update"],
        },
        {"apiGroups": [""], "resources": ["configmaps", "secrets", "services"], "verbs": MANAGE},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": ["apps"], "resources": ["daemonsets", "deployments"], "verbs": MANAGE},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": MANAGE},
        {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": MANAGE},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": MANAGE},
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings", "kopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"],
        },
    ]
