"""Validation of ``KVCachePool`` / ``ModelServing`` documents, with field paths.

Two layers, as a cluster would apply them:

1. the CRD schema (what the API server checks, plus strict unknown-field
   checking as ``kubectl --validate=strict`` does), reporting every error;
2. the typed models of ``kvmarina.specs`` (cross-field rules such as
   ``budget.min <= budget.max``), once the schema passes.

Every problem is an ``Issue(path, message)``; nothing raises a traceback at a
user. ``parse_resource`` is the typed entry point the operator and local mode use.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kvmarina import specs
from kvmarina.crd import closed, schema_for_kind
from kvmarina.quantity import QUANTITY_PATTERN

KINDS: dict[str, type[BaseModel]] = {
    "KVCachePool": specs.KVCachePoolSpec,
    "ModelServing": specs.ModelServingSpec,
}
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in one document: where (a dotted field path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """A document that does not validate; ``issues`` lists every problem."""

    def __init__(self, source: str, issues: Sequence[Issue]) -> None:
        self.source = source
        self.issues = list(issues)
        lines = "\n".join(f"  {i}" for i in self.issues)
        super().__init__(f"{source}: {len(self.issues)} problem(s)\n{lines}")


@dataclass(frozen=True, slots=True)
class Resource:
    """A validated custom resource: identity plus its typed spec."""

    kind: str
    name: str
    namespace: str | None
    spec: Any  # specs.KVCachePoolSpec | specs.ModelServingSpec
    metadata: dict[str, Any]


def format_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@functools.cache
def _validator(kind: str) -> Any:
    """The strict schema validator of a kind: built once (rendering the CRD schema
    from the models takes tens of milliseconds; the operator validates every pass)."""
    from jsonschema import Draft4Validator

    return Draft4Validator(closed(schema_for_kind(kind)))


def _schema_issues(doc: dict[str, Any], kind: str) -> list[Issue]:
    validator = _validator(kind)
    issues = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties":
            known = ", ".join(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - set(err.schema.get("properties", {}))):
                issues.append(
                    Issue(format_path([*path, extra]), f"unknown field; known fields: {known}")
                )
            continue
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else err.message
            issues.append(Issue(format_path([*path, missing]), "required field is missing"))
            continue
        if err.validator == "enum":
            allowed = ", ".join(map(str, err.validator_value))
            issues.append(
                Issue(format_path(path), f"{err.instance!r} is not allowed; allowed: {allowed}")
            )
            continue
        if err.validator == "pattern" and err.validator_value == QUANTITY_PATTERN:
            issues.append(
                Issue(
                    format_path(path),
                    f"{err.instance!r} is not a byte quantity; write e.g. 512Mi, 40Gi or 1.5G",
                )
            )
            continue
        issues.append(Issue(format_path(path), err.message))
    return issues


def _model_issues(exc: ValidationError, prefix: str) -> list[Issue]:
    issues = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        issues.append(Issue(format_path([prefix, *err["loc"]]), msg))
    return issues


def _metadata_issues(doc: dict[str, Any], kind: str) -> list[Issue]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return [Issue("metadata", "required: an object with at least 'name'")]
    issues = []
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 63:
        issues.append(
            Issue(
                "metadata.name",
                f"{name!r} is not a valid name: lower-case letters, digits "
                "and '-', starting and ending with a letter or digit, at most 63 characters",
            )
        )
    if kind == "KVCachePool" and meta.get("namespace"):
        issues.append(Issue("metadata.namespace", "KVCachePool is cluster-scoped; remove it"))
    return issues


def check_document(doc: Any) -> list[Issue]:
    """Every problem of one parsed YAML document (empty list when valid)."""
    if not isinstance(doc, dict):
        return [Issue("", f"expected a mapping (a Kubernetes object), got {type(doc).__name__}")]
    issues: list[Issue] = []
    if doc.get("apiVersion") != specs.API_VERSION:
        issues.append(
            Issue(
                "apiVersion", f"{doc.get('apiVersion')!r} is not supported; use {specs.API_VERSION}"
            )
        )
    kind = doc.get("kind")
    if kind not in KINDS:
        issues.append(
            Issue("kind", f"{kind!r} is not a kvmarina kind; allowed: {', '.join(KINDS)}")
        )
        return issues
    issues += _metadata_issues(doc, kind)
    schema_issues = _schema_issues(doc, kind)
    issues += schema_issues
    try:
        KINDS[kind].model_validate(doc.get("spec") or {})
    except ValidationError as exc:
        # The typed model repeats most schema errors; keep only what it adds
        # (cross-field rules), so each problem is reported once.
        seen = {i.path for i in schema_issues}
        issues += [
            i
            for i in _model_issues(exc, "spec")
            if not any(
                i.path == p
                or p.startswith(i.path + ".")
                or i.path.startswith(p + ".")
                or p.startswith(i.path + "[")
                for p in seen
            )
        ]
    return issues


def parse_resource(doc: Any, source: str = "<object>") -> Resource:
    """Validate and type one document; ``SpecError`` listing every problem otherwise."""
    issues = check_document(doc)
    if issues:
        raise SpecError(source, issues)
    meta = doc["metadata"]
    spec = KINDS[doc["kind"]].model_validate(doc.get("spec") or {})
    return Resource(doc["kind"], meta["name"], meta.get("namespace"), spec, dict(meta))


def load_documents(text: str, source: str) -> list[Any]:
    """YAML documents of a file; ``SpecError`` with line and column on bad YAML."""
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, [Issue("", f"malformed YAML: {where}{problem}")]) from exc


def load_file(path: str) -> tuple[list[Resource], list[tuple[str, Issue]]]:
    """Resources of one file and every problem found, labelled by document."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    resources: list[Resource] = []
    problems: list[tuple[str, Issue]] = []
    try:
        docs = load_documents(text, path)
    except SpecError as exc:
        return [], [(path, i) for i in exc.issues]
    for n, doc in enumerate(docs):
        label = _label(doc, path, n)
        try:
            resources.append(parse_resource(doc, label))
        except SpecError as exc:
            problems += [(label, i) for i in exc.issues]
    return resources, problems


def _label(doc: Any, path: str, n: int) -> str:
    if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
        return f"{path} [{doc.get('kind', '?')}/{doc['metadata'].get('name', '?')}]"
    return f"{path} [document {n + 1}]"


def pair_issues(resources: Sequence[Resource]) -> list[tuple[str, Issue]]:
    """Problems of each serving on its pool, for the servings whose pool is among
    ``resources`` (what the operator reports as ``InvalidSpec``)."""
    from kvmarina.serving import check_serving

    pools = {r.name: r for r in resources if r.kind == "KVCachePool"}
    out = []
    for s in resources:
        pool = pools.get(s.spec.pool_ref.name) if s.kind == "ModelServing" else None
        if pool is not None:
            label = f"[ModelServing/{s.name} on KVCachePool/{pool.name}]"
            out += [(label, Issue("", p)) for p in check_serving(s.spec, pool.name, pool.spec)]
    return out


def validate_files(paths: Sequence[str]) -> int:
    """``kvmarina validate``: print every problem of every file, and of every serving on
    a pool given alongside it; 1 if any, else 0."""
    total = 0
    count = 0
    valid: list[Resource] = []
    for path in paths:
        try:
            resources, problems = load_file(path)
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            total += 1
            continue
        count += len(resources)
        valid += resources
        for label, issue in problems:
            print(f"{label}: {issue}", file=sys.stderr)
        total += len(problems)
        for r in resources:
            where = f"{r.namespace}/{r.name}" if r.namespace else r.name
            print(f"ok  {path} [{r.kind}/{where}]")
    for label, issue in pair_issues(valid):
        print(f"{label}: {issue}", file=sys.stderr)
        total += 1
    if total:
        print(f"{total} problem(s) found", file=sys.stderr)
        return 1
    print(f"{count} object(s) valid")
    return 0
