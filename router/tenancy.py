"""The tenant salt (docs/design.md "Tenancy"): derived by the router, never taken raw
from a client.

* scope ``none``: private to the serving -> salt names namespace and serving;
* scope ``namespace``: shared inside the namespace -> salt names the namespace;
* scope ``cluster``: shared by everyone -> no scope part.

When a trusted tenant header is configured, the tenant it names is appended, so
two tenants never match each other's blocks. A client salt (``x-kvmarina-salt``)
is folded in only when the serving allows it. Parts are length-prefixed so that
no two different (scope, tenant, client) triples give the same salt.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from kvmarina.headers import SALT_HEADER
from kvmarina.router.config import SharingConfig
from kvmarina.tenancy import scope_salt


def derive_salt(
    sharing: SharingConfig, namespace: str, serving: str, headers: Mapping[str, str]
) -> str:
    """The salt for one request; ``headers`` are the client's (case-insensitive map)."""
    tenant = headers.get(sharing.tenant_header, "") if sharing.tenant_header else None
    client = headers.get(SALT_HEADER) if sharing.allow_client_salt else None
    return scope_salt(
        sharing.scope,
        namespace,
        serving,
        tenant=None if tenant is None else _ascii(tenant),
        client_salt=None if client is None else _ascii(client),
    )


_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _ascii(value: str) -> str:
    """A client's header value as printable ASCII, one to one: the salt travels to the
    engine in a header (Latin-1 on the wire) and is hashed as UTF-8, so a value outside
    ASCII (or bytes that are not UTF-8) is percent-encoded, never a 500."""
    return quote(value.encode("utf-8", "surrogateescape"), safe=_PRINTABLE)
