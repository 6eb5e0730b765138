"""The tenant salt (docs/design.md "Tenancy"): one derivation for router and engine.

* scope ``none``: private to the serving -> salt names namespace and serving;
* scope ``namespace``: shared inside the namespace -> salt names the namespace;
* scope ``cluster``: shared by everyone -> no scope part.

A trusted tenant (from the header the serving names) is appended, so two tenants
never match each other's blocks; a client salt is folded in only when the
serving allows it. Parts are length-prefixed so that no two different
(scope, tenant, client) triples give the same salt.
"""

from __future__ import annotations

SCOPES = ("none", "namespace", "cluster")


def _part(tag: str, value: str) -> str:
    return f"{tag}{len(value)}:{value}"


def scope_salt(
    scope: str,
    namespace: str,
    serving: str,
    *,
    tenant: str | None = None,
    client_salt: str | None = None,
) -> str:
    """The salt of a request; ``tenant`` is None when the serving trusts no tenant header."""
    if scope == "cluster":
        parts = [_part("c", "")]
    elif scope == "namespace":
        parts = [_part("n", namespace)]
    elif scope == "none":
        parts = [_part("s", f"{namespace}/{serving}")]
    else:
        raise ValueError(f"unknown sharing scope {scope!r}; allowed: {', '.join(SCOPES)}")
    if tenant is not None:
        parts.append(_part("t", tenant))
    if client_salt:
        parts.append(_part("x", client_salt))
    return "|".join(parts)
