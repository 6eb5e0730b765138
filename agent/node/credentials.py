"""Per-serving registration credentials: token -> (serving, namespace, sharing scope).

The operator writes one file for the pool (mounted from a Secret)::

    servings:
      - {name: chat, namespace: team-a, scope: namespace, token: "<random>"}

and mounts each serving's own token into its engine pods. An engine presents
its token when it registers; the agent maps it to the serving and its scope and
refuses anything else. Tokens are compared in constant time. The file (or a
directory of such files) is re-read when it changes, checked at each registration,
so servings created after the agent started can register.

The *scope key* names the memory region and the index partition a serving may
see: ``cluster`` -> one key for all; ``namespace`` -> one per namespace;
``none`` -> one per serving.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

SCOPES = ("none", "namespace", "cluster")
log = logging.getLogger(__name__)


class CredentialError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Identity:
    serving: str
    namespace: str
    scope: str

    @property
    def key(self) -> str:
        """The serving's node-wide name (``namespace/serving``): budgets and usage."""
        return f"{self.namespace}/{self.serving}"

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
        self.path: Path | None = None
        self._signature: tuple[tuple[str, int, int, int], ...] = ()

    @classmethod
    def load(cls, path: str | Path | None) -> CredentialStore:
        """Read a credentials file, or every ``*.yaml``/``*.yml``/``*.json`` file of a
        directory (a mounted Secret). ``refresh()`` re-reads it when it changes."""
        if path is None:
            return cls([])
        p = Path(path)
        store = cls(_read_entries(p))
        store.path, store._signature = p, _signature(p)
        return store

    def refresh(self) -> bool:
        """Re-read the source if it changed (the operator adds a serving, rotates a
        token: kubelet swaps the mounted Secret). A broken update keeps the old
        credentials and is logged. Returns whether new credentials took effect."""
        if self.path is None:
            return False
        sig = _signature(self.path)
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            fresh = CredentialStore(_read_entries(self.path))
        except CredentialError as exc:
            log.error("kept the previous credentials: %s", exc)
            return False
        self._entries = fresh._entries
        log.info("reloaded %d serving credential(s) from %s", len(self._entries), self.path)
        return True

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


def _files(p: Path) -> list[Path]:
    if not p.is_dir():
        return [p]
    # A mounted Secret also holds ..data and timestamped folders: skip dot entries.
    return sorted(
        f
        for f in p.iterdir()
        if not f.name.startswith(".") and f.suffix in (".yaml", ".yml", ".json") and f.is_file()
    )


def _signature(p: Path) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    try:
        for f in _files(p):
            st = f.stat()  # follows the Secret's symlinks: a swap changes inode/mtime
            out.append((f.name, st.st_ino, st.st_mtime_ns, st.st_size))
    except OSError:
        return (("?", 0, 0, 0),)
    return tuple(out)


def _read_entries(p: Path) -> list[tuple[str, Identity]]:
    entries: list[tuple[str, Identity]] = []
    try:
        files = _files(p)
    except OSError as exc:
        raise CredentialError(f"cannot read credentials {p}: {exc.strerror}") from None
    for f in files:
        try:
            text = f.read_text()
        except OSError as exc:
            raise CredentialError(f"cannot read credentials {f}: {exc.strerror}") from None
        try:
            data = json.loads(text) if f.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise CredentialError(f"{f}: not valid YAML/JSON: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise CredentialError(f"{f}: expected a mapping with a 'servings' list")
        for i, rec in enumerate((data or {}).get("servings") or []):
            try:
                ident = Identity(
                    str(rec["name"]),
                    str(rec.get("namespace", "default")),
                    str(rec.get("scope", "namespace")),
                )
                entries.append((str(rec["token"]), ident))
            except (KeyError, TypeError, AttributeError) as exc:
                raise CredentialError(f"{f}: servings[{i}] lacks {exc}") from None
    return entries
