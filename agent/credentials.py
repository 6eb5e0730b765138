"""Per-serving registration credentials: token -> (serving, namespace, sharing scope).

The operator writes one file for the pool (mounted from a Secret)::

    servings:
      - {name: chat, namespace: team-a, scope: namespace, token: "<random>"}

and mounts each serving's own token into its engine pods. An engine presents
its token when it registers; the agent maps it to the serving and its scope and
refuses anything else. Tokens are compared in constant time.

The *scope key* names the memory region and the index partition a serving may
see: ``cluster`` -> one key for all; ``namespace`` -> one per namespace;
``none`` -> one per serving.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

SCOPES = ("none", "namespace", "cluster")


class CredentialError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Identity:
    serving: str
    namespace: str
    scope: str

    @property
    def scope_key(self) -> str:
        if self.scope == "cluster":
            return "cluster"
        if self.scope == "namespace":
            return f"ns/{self.namespace}"
        return f"serving/{self.namespace}/{self.serving}"


class CredentialStore:
    """Invariant: tokens are unique and non-empty; every identity has a valid scope."""

    def __init__(self, entries: list[tuple[str, Identity]]) -> None:
        seen: set[str] = set()
        for token, ident in entries:
            if not token:
                raise CredentialError(f"serving {ident.serving!r} has an empty token")
            if token in seen:
                raise CredentialError(f"two servings share one token ({ident.serving!r})")
            if ident.scope not in SCOPES:
                raise CredentialError(
                    f"serving {ident.serving!r}: scope {ident.scope!r} is not "
                    f"one of {', '.join(SCOPES)}"
                )
            seen.add(token)
        self._entries = list(entries)

    @classmethod
    def load(cls, path: str | Path | None) -> CredentialStore:
        if path is None:
            return cls([])
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise CredentialError(f"cannot read credentials {p}: {exc.strerror}") from None
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise CredentialError(f"{p}: not valid YAML/JSON: {exc}") from None
        entries = []
        for i, rec in enumerate((data or {}).get("servings", [])):
            try:
                ident = Identity(
                    str(rec["name"]),
                    str(rec.get("namespace", "default")),
                    str(rec.get("scope", "namespace")),
                )
                entries.append((str(rec["token"]), ident))
            except (KeyError, TypeError) as exc:
                raise CredentialError(f"{p}: servings[{i}] lacks {exc}") from None
        return cls(entries)

    def identify(self, token: str) -> Identity | None:
        """The identity a token belongs to; ``None`` for an unknown token.

        Every entry is compared (no early exit) so timing says nothing about
        which prefix of which token matched.
        """
        found = None
        given = token.encode("utf-8")
        for known, ident in self._entries:
            if hmac.compare_digest(given, known.encode("utf-8")):
                found = ident
        return found

    def __len__(self) -> int:
        return len(self._entries)
