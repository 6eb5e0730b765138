"""Applying planned children: only what differs from the live object, and pruning the
optional ones no longer planned.

A child is applied only when the live object lacks part of the planned one
(``contains``), so a settled object costs reads only; the planners (``plan_pool``,
``plan_serving``) are pure and this is their one side effect on the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmarina.operator import naming as n
from kvmarina.operator.kube import KubeClient

Key = tuple[str, str | None, str]  # kind, namespace, name


def contains(live: Any, want: Any) -> bool:
    """``want`` is a sub-document of ``live`` (what apply would not change)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in live and contains(live[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(live, list)
            and len(live) == len(want)
            and all(contains(a, b) for a, b in zip(live, want, strict=True))
        )
    return bool(live == want)


def key_of(m: dict[str, Any]) -> Key:
    return m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]


@dataclass
class Applier:
    """Applies manifests through one API client.

    Invariant: ``absent`` holds only optional children this process saw missing and
    has not created since; it spares a read per pass and is safe to lose (a restart
    re-reads once)."""

    kube: KubeClient
    absent: set[Key] = field(default_factory=set)

    async def apply_all(
        self,
        manifests: list[dict[str, Any]],
        known: dict[Key, Any] | None = None,
        new: bool = False,
    ) -> tuple[int, dict[Key, Any]]:
        """Apply the manifests that differ from the live objects: (number applied,
        live objects by key). ``known`` are live objects already read this pass;
        ``new``: the owner was just created, so its children are applied unread."""
        live_by_key = dict(known or {})
        changed = 0
        for m in manifests:
            k = key_of(m)
            if new and k not in live_by_key:
                live_by_key[k] = None
            if k not in live_by_key:
                live_by_key[k] = await self.kube.get(m["apiVersion"], k[0], k[1], k[2])
            self.absent.discard(k)
            if live_by_key[k] is not None and contains(live_by_key[k], m):
                continue
            live_by_key[k] = await self.kube.apply(m, missing=live_by_key[k] is None)
            changed += 1
        return changed, live_by_key

    async def prune(self, optional: list[tuple[str, str, str, str]], planned: set[Key]) -> None:
        """Delete optional children (apiVersion, kind, namespace, name) no longer planned."""
        for api, kind, ns, name in optional:
            k = (kind, ns, name)
            if k in planned or k in self.absent:
                continue
            live = await self.kube.get(api, kind, ns, name)
            if (
                live is not None
                and n.PART_OF.items() <= (live.get("metadata", {}).get("labels") or {}).items()
            ):
                await self.kube.delete(api, kind, ns, name)
            self.absent.add(k)
