"""CRD schemas against the examples: every example validates; every documented bad
example (``examples/invalid/``) is rejected by the layer its header names, with the
field path it names.

Layers: ``schema`` — the generated CRD (``crds/``, also in the chart) as an API server
with strict field validation applies it; ``model`` — the typed models' cross-field
rules (``kvmarina validate``, the operator's ``InvalidSpec``); ``operator`` — the
operator's checks of a serving against its pool (``InvalidSpec``, no children).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kvmarina.crd import closed
from kvmarina.serving import check_serving
from kvmarina.validate import Resource, check_document, parse_resource

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").rglob("*.yaml") if "invalid" not in p.parts)
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))
CHART_CRDS = REPO / "charts" / "kvmarina" / "templates" / "crds"


def crd_schemas() -> dict[str, dict[str, Any]]:
    """The generated CRDs on disk (what a cluster is given), by kind."""
    out = {}
    for path in (REPO / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        out[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out


SCHEMAS = crd_schemas()


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Paths the CRD schema rejects, strict about unknown fields (OpenAPI v3.0 is
    draft-4 semantics: a boolean ``exclusiveMinimum``)."""
    validator = jsonschema.Draft4Validator(closed(SCHEMAS[doc["kind"]]))
    return [".".join(map(str, e.absolute_path)) for e in validator.iter_errors(doc)]


def servings_with_pools(resources: list[Resource]) -> list[tuple[Resource, Resource]]:
    pools = {r.name: r for r in resources if r.kind == "KVCachePool"}
    return [
        (r, pools[r.spec.pool_ref.name])
        for r in resources
        if r.kind == "ModelServing" and r.spec.pool_ref.name in pools
    ]


def header(path: Path, key: str) -> list[str]:
    prefix = f"# {key}:"
    lines = path.read_text().splitlines()
    return [ln[len(prefix) :].strip() for ln in lines if ln.startswith(prefix)]


def test_the_tables_are_not_empty() -> None:
    assert len(EXAMPLES) >= 3 and len(INVALID) >= 8
    layers = {header(p, "layer")[0] for p in INVALID}
    assert layers == {"schema", "model", "operator"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_against_the_generated_crds(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert schema_errors(doc) == [], doc["metadata"]
    resources = [parse_resource(d, str(path)) for d in docs]
    everything = resources + [
        parse_resource(d)
        for other in EXAMPLES
        if other != path
        for d in yaml.safe_load_all(other.read_text())
        if d
    ]
    # a serving and the pool it names (in its file or another example) fit together
    for serving, pool in servings_with_pools(everything):
        if serving in resources or pool in resources:
            assert check_serving(serving.spec, pool.name, pool.spec) == []


def test_the_chart_ships_the_same_crd_schemas() -> None:
    for path in CHART_CRDS.glob("*.yaml"):
        body = "\n".join(ln for ln in path.read_text().splitlines() if "{{" not in ln)
        crd = yaml.safe_load(body)
        kind = crd["spec"]["names"]["kind"]
        assert crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] == SCHEMAS[kind]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_every_documented_bad_example_is_rejected_with_its_field_path(path: Path) -> None:
    (layer,) = header(path, "layer")
    (expect,) = header(path, "expect")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if layer == "operator":
        resources = [parse_resource(d, str(path)) for d in docs]  # each valid alone
        assert all(schema_errors(d) == [] for d in docs)
        ((serving, pool),) = servings_with_pools(resources)
        problems = check_serving(serving.spec, pool.name, pool.spec)
        assert any(expect in p for p in problems), (expect, problems)
        return
    (doc,) = docs
    field = expect.split(":", 1)[0]
    rejected_by_schema = schema_errors(doc)
    if layer == "schema":  # the API server refuses it, at that path
        assert any(field.startswith(p) or p.startswith(field) for p in rejected_by_schema), (
            field,
            rejected_by_schema,
        )
    else:  # stored by the API server, refused by the typed model
        assert rejected_by_schema == []
    issues = [str(i) for i in check_document(doc)]
    assert any(i.startswith(expect) for i in issues), (expect, issues)
