"""Status documents and conditions (metav1.Condition semantics).

``lastTransitionTime`` changes only when a condition's status flips, and a status
identical to the live one produces no patch: a periodic reconcile of a settled
object writes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "InvalidSpec")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(ctype: str, ok: bool, reason: str, message: str, gen: int | None) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": ctype,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
    }
    if gen is not None:
        cond["observedGeneration"] = gen
    return cond


def with_gen(gen: int | None, **fields: Any) -> dict[str, Any]:
    out = {"observedGeneration": gen} if gen is not None else {}
    out.update({k: v for k, v in fields.items() if v is not None})
    return out


def stamp(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``new`` with each condition's transition time carried over from ``old`` when its
    status did not change, and set to now when it did (or it is new)."""
    before = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = before.get(c["type"])
        same = prev is not None and prev.get("status") == c["status"]
        t = prev.get("lastTransitionTime") if same and prev else None
        out.append({**c, "lastTransitionTime": t or now()})
    return out


def diff(live: dict[str, Any] | None, want: dict[str, Any]) -> dict[str, Any]:
    """The status patch that turns ``live`` into ``want`` (empty when nothing changed).
    Keys ``live`` has and ``want`` lacks are cleared with ``None`` (merge-patch)."""
    live = live or {}
    want = {**want, "conditions": stamp(live.get("conditions"), want.get("conditions", []))}
    patch = {k: v for k, v in want.items() if live.get(k) != v}
    patch.update({k: None for k in live if k not in want and live[k] is not None})
    return patch


def invalid(gen: int | None, message: str) -> dict[str, Any]:
    return with_gen(
        gen,
        conditions=[
            condition("Ready", False, "InvalidSpec", message, gen),
            condition("Progressing", False, "InvalidSpec", message, gen),
            condition("Degraded", False, "InvalidSpec", "", gen),
            condition("InvalidSpec", True, "InvalidSpec", message, gen),
        ],
    )
