"""The one module of the operator that talks to the Kubernetes API (async, aiohttp).

Server-side apply with field manager ``kvmarina``: the operator states the whole
desired object and the API server merges it, so hand edits to fields we own are
reverted and fields others own are left alone. An API without apply for a path
(the test emulator) answers 404 for a missing object; then we create it.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

FIELD_MANAGER = "kvmarina"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

# kind -> (plural, namespaced)
KINDS: dict[str, tuple[str, bool]] = {
    "ConfigMap": ("configmaps", True),
    "Secret": ("secrets", True),
    "Service": ("services", True),
    "Pod": ("pods", True),
    "DaemonSet": ("daemonsets", True),
    "Deployment": ("deployments", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "HorizontalPodAutoscaler": ("horizontalpodautoscalers", True),
    "NetworkPolicy": ("networkpolicies", True),
    "KVCachePool": ("kvcachepools", False),
    "ModelServing": ("modelservings", True),
}


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    plural, namespaced = KINDS[kind]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


@dataclass
class KubeClient:
    server: str
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    requests: int = 0
    # Whether apply creates missing objects (a real API server does; the test emulator
    # answers 404). Learnt on the first 404: then a known-missing object is POSTed.
    apply_creates: bool = True
    _session: aiohttp.ClientSession | None = None

    @classmethod
    def from_env(cls) -> KubeClient:
        """``KVMARINA_KUBE_SERVER`` (tests, development), else the in-cluster service account."""
        server = os.environ.get("KVMARINA_KUBE_SERVER")
        if server:
            return cls(server.rstrip("/"))
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT"),
        )
        if not host or not port:
            raise KubeError(0, "no Kubernetes API: not in a cluster and KVMARINA_KUBE_SERVER unset")
        ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        return cls(f"https://{host}:{port}", (SA_DIR / "token").read_text().strip(), ctx)

    async def _req(
        self,
        method: str,
        url: str,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body) if body is not None else None
        self.requests += 1
        async with self._session.request(
            method,
            self.server + url,
            data=data,
            headers=headers,
            params=params,
            ssl=self.ssl_context or True,
        ) as resp:
            text = await resp.text()
            if resp.status == 404:
                return None
            if resp.status >= 400:
                raise KubeError(resp.status, text[:300])
            return json.loads(text) if text else {}

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Any:
        return await self._req("GET", path(api_version, kind, namespace, name))

    async def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        selector: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        params = (
            {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())}
            if selector
            else None
        )
        found = await self._req("GET", path(api_version, kind, namespace), params=params)
        items = (found or {}).get("items", [])
        if selector:  # filter again: not every API (the emulator) honours labelSelector
            items = [
                i
                for i in items
                if all(
                    i.get("metadata", {}).get("labels", {}).get(k) == v for k, v in selector.items()
                )
            ]
        return items  # type: ignore[no-any-return]

    async def apply(self, obj: dict[str, Any], missing: bool = False) -> Any:
        """Server-side apply; ``missing``: the caller just saw the object absent."""
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        params = {"fieldManager": FIELD_MANAGER, "force": "true"}
        result = None
        if not missing or self.apply_creates:
            result = await self._req("PATCH", url, obj, "application/apply-patch+yaml", params)
            if result is None:
                self.apply_creates = False
        if result is None:  # no such object and no apply-create: create it
            try:
                result = await self._req(
                    "POST",
                    path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
                    obj,
                    params={"fieldManager": FIELD_MANAGER},
                )
            except KubeError as exc:
                if exc.status != 409:
                    raise
                # created meanwhile by someone else: apply over it
                result = await self._req("PATCH", url, obj, "application/apply-patch+yaml", params)
        return result

    async def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        body: dict[str, Any],
        subresource: str | None = None,
    ) -> Any:
        """JSON merge patch (``None`` deletes a key); ``None`` if the object is missing."""
        url = path(api_version, kind, namespace, name)
        if subresource:
            url += f"/{subresource}"
        params = {"fieldManager": FIELD_MANAGER}
        return await self._req("PATCH", url, body, "application/merge-patch+json", params)

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        await self._req("DELETE", path(api_version, kind, namespace, name))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
