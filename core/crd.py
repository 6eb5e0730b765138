"""Render the CustomResourceDefinitions from the typed models in ``kvmarina.specs``.

The CRDs under ``crds/`` are generated (``kvmarina crds --out crds``) and a test
fails when they drift from the models. Pydantic emits JSON Schema 2020-12;
Kubernetes wants a *structural* OpenAPI v3.0 schema: no ``$ref``, no ``anyOf``
for optional fields, a boolean ``exclusiveMinimum``, ``default: {}`` on nested
objects so the API server applies nested defaults. ``structural`` does that
translation; ``closed`` adds what ``kubectl --validate=strict`` adds (unknown
fields are errors) for local validation.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kvmarina import specs

_KEEP = {
    "type", "description", "default", "enum", "minimum", "maximum", "minLength", "maxLength",
    "pattern", "items", "properties", "required", "additionalProperties", "format",
    "minItems", "maxItems",
}  # fmt: skip


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return _resolve(target, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        target = dict(_resolve(node["allOf"][0], defs))
        target.update({k: v for k, v in node.items() if k != "allOf"})
        return target
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node['anyOf']}")
        target = dict(_resolve(options[0], defs))
        target.update({k: v for k, v in node.items() if k not in ("anyOf", "default")})
        if node.get("default") is not None:
            target["default"] = node["default"]
        return target
    return node


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one pydantic JSON-schema node into a structural CRD schema node."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key in _KEEP:
            out[key] = value
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if "properties" in out:
        out["type"] = "object"
        out["properties"] = {k: structural(v, defs) for k, v in out["properties"].items()}
        required = set(out.get("required", ()))
        for name, prop in out["properties"].items():
            if name not in required and prop.get("type") == "object" and "properties" in prop:
                prop.setdefault("default", {})
    if isinstance(out.get("items"), dict):
        out["items"] = structural(out["items"], defs)
    extra = out.get("additionalProperties")
    if extra is False or extra is True:
        del out["additionalProperties"]
    elif isinstance(extra, dict):
        out["additionalProperties"] = structural(extra, defs)
    return _ordered(out)


_ORDER = ("type", "description", "default", "enum", "minimum", "maximum")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Readable key order: type and description first, nested schemas last."""
    head = {k: node[k] for k in _ORDER if k in node}
    tail = {k: v for k, v in node.items() if k not in head}
    return {**head, **tail}


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy in which every object with ``properties`` rejects unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any]) -> None:
        if "properties" in node:
            node.setdefault("additionalProperties", False)
            for name, child in node["properties"].items():
                if name != "metadata":
                    walk(child)
        if isinstance(node.get("items"), dict):
            walk(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])

    walk(schema)
    return schema


def _root(spec: type[BaseModel], status: type[BaseModel], doc: str, spec_required: bool) -> Any:
    root: dict[str, Any] = {
        "type": "object",
        "description": doc,
        "properties": {
            "apiVersion": {"type": "string", "description": "kvmarina.io/v1alpha1"},
            "kind": {"type": "string", "description": "The kind of this object."},
            "metadata": {"type": "object"},
            "spec": model_schema(spec),
            "status": model_schema(status),
        },
    }
    if spec_required:
        root["required"] = ["spec"]
    else:
        root["properties"]["spec"]["default"] = {}
    return root


def _condition_column(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{name}")].status',
    }


def _wide(name: str, type_: str, path: str) -> dict[str, Any]:
    """A column shown by ``kubectl get -o wide`` only."""
    return {"name": name, "type": type_, "jsonPath": path, "priority": 1}


def pool_crd() -> dict[str, Any]:
    schema = _root(
        specs.KVCachePoolSpec,
        specs.KVCachePoolStatus,
        "KVCachePool: a node-level KV cache (device and host tiers) shared by the "
        "ModelServings that reference it.",
        spec_required=False,
    )
    return _crd(
        plural="kvcachepools",
        kind="KVCachePool",
        scope="Cluster",
        short_names=["kvpool"],
        schema=schema,
        columns=[
            _condition_column("Ready"),
            {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodesReady"},
            {"name": "Blocks", "type": "integer", "jsonPath": ".status.blocks"},
            {"name": "HitRate", "type": "number", "jsonPath": ".status.hitRate"},
            _wide("Servings", "integer", ".status.servings"),
            _wide("Backend", "string", ".spec.memory.backend"),
            _wide("Device", "string", ".spec.memory.device"),
            _wide("Host", "string", ".spec.memory.host"),
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        scale=False,
    )


def serving_crd() -> dict[str, Any]:
    schema = _root(
        specs.ModelServingSpec,
        specs.ModelServingStatus,
        "ModelServing: a model served by engine pods sharing a KVCachePool, behind a "
        "cache-aware router.",
        spec_required=True,
    )
    return _crd(
        plural="modelservings",
        kind="ModelServing",
        scope="Namespaced",
        short_names=["kvserve"],
        schema=schema,
        columns=[
            {"name": "Pool", "type": "string", "jsonPath": ".spec.poolRef.name"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "HitRate", "type": "number", "jsonPath": ".status.prefixHitRate"},
            {"name": "URL", "type": "string", "jsonPath": ".status.routerUrl"},
            _wide("Model", "string", ".spec.model.name"),
            _wide("Policy", "string", ".spec.routing.policy"),
            {**_condition_column("Ready"), "name": "Status", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        scale=True,
    )


def _crd(
    *,
    plural: str,
    kind: str,
    scope: str,
    short_names: list[str],
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
    scale: bool,
) -> dict[str, Any]:
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{specs.GROUP}"},
        "spec": {
            "group": specs.GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["kvmarina"],
            },
            "scope": scope,
            "versions": [
                {
                    "name": specs.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [pool_crd(), serving_crd()]


def crd_filename(crd: dict[str, Any]) -> str:
    return f"{specs.GROUP}_{crd['spec']['names']['plural']}.yaml"


def render(crd: dict[str, Any]) -> str:
    header = "# Generated from core/specs.py by `kvmarina crds --out crds`. Do not edit.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=100)


def schema_for_kind(kind: str) -> dict[str, Any]:
    for crd in all_crds():
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]
    raise KeyError(kind)


def write_crds(out: str | None) -> int:
    if out is None:
        sys.stdout.write("---\n".join(render(c) for c in all_crds()))
        return 0
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for crd in all_crds():
        path = folder / crd_filename(crd)
        path.write_text(render(crd))
        print(f"wrote {path}")
    return 0
