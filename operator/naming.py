"""Names and labels of everything the operator creates (one place, so they never drift)."""

from __future__ import annotations

GROUP = "kvmarina.io"
PART_OF = {
    "app.kubernetes.io/part-of": "kvmarina",
    "app.kubernetes.io/managed-by": "kvmarina-operator",
}


def labels(component: str, instance: str, **extra: str) -> dict[str, str]:
    return {
        **PART_OF,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": instance,
        **extra,
    }


def selector(component: str, instance: str) -> dict[str, str]:
    return {"app.kubernetes.io/component": component, "app.kubernetes.io/instance": instance}


def pool_instance(pool: str) -> str:
    return f"pool-{pool}"


def agent_name(pool: str) -> str:
    return f"kvmarina-agent-{pool}"


def pool_config_name(pool: str) -> str:
    return f"kvmarina-pool-{pool}"


def pool_secret_name(pool: str) -> str:
    return f"kvmarina-pool-{pool}-transfer"


def pool_credentials_name(pool: str) -> str:
    return f"kvmarina-pool-{pool}-servings"


def engine_name(serving: str) -> str:
    return f"{serving}-engine"


def router_name(serving: str) -> str:
    return f"{serving}-router"


def serving_token_name(serving: str) -> str:
    return f"{serving}-kvmarina-token"


def router_config_name(serving: str) -> str:
    return f"{serving}-router-config"


# The operator's own pods (the chart labels them so, whatever its nameOverride): the
# NetworkPolicies let them read agents' /stats and engines' /metrics.
OPERATOR_SELECTOR = {
    "app.kubernetes.io/part-of": "kvmarina",
    "app.kubernetes.io/component": "operator",
}
