"""CR validation: examples pass, every documented bad example fails with its field paths."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from kvmarina import specs
from kvmarina.crd import all_crds, crd_filename, render
from kvmarina.validate import SpecError, load_file, parse_resource

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BAD = sorted((Path(__file__).parent / "bad").glob("*.yaml"))


def _crd_schemas_from_disk() -> dict[str, dict[str, object]]:
    out = {}
    for path in (REPO / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        out[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out


def test_crds_on_disk_match_the_models() -> None:
    for crd in all_crds():
        path = REPO / "crds" / crd_filename(crd)
        assert path.read_text() == render(crd), f"{path} is stale: run `kvmarina crds --out crds`"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    resources, problems = load_file(str(path))
    assert problems == []
    assert resources
    schemas = _crd_schemas_from_disk()
    for doc in yaml.safe_load_all(path.read_text()):
        # CRD schemas are OpenAPI v3.0: draft-4 semantics (boolean exclusiveMinimum).
        jsonschema.Draft4Validator(schemas[doc["kind"]]).validate(doc)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_examples_fail_with_field_paths(path: Path) -> None:
    text = path.read_text()
    expected = [
        ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("# expect:")
    ]
    assert expected, "a bad example must say what it expects"
    _, problems = load_file(str(path))
    rendered = [str(issue) for _, issue in problems]
    for want in expected:
        assert any(r.startswith(want) or want in r for r in rendered), (want, rendered)


def test_every_problem_is_reported_at_once() -> None:
    _, problems = load_file(str(Path(__file__).parent / "bad" / "out-of-range.yaml"))
    assert len(problems) == 4


def test_crd_schemas_are_structural_and_documented() -> None:
    def walk(node: dict[str, object], path: str) -> None:
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        props = node.get("properties")
        if isinstance(props, dict):
            assert node.get("type") == "object", path
            for name, child in props.items():
                if path.count(".") >= 1 or name in ("spec", "status"):
                    assert child.get("description"), f"{path}.{name} has no description"
                walk(child, f"{path}.{name}")
        items = node.get("items")
        if isinstance(items, dict):
            walk(items, path + "[]")
        assert node.get("type") or node.get("x-kubernetes-int-or-string") or path == "", path

    for crd in all_crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        walk(schema, "")


def test_defaults_are_applied_and_typed() -> None:
    doc = yaml.safe_load((REPO / "examples" / "serving.yaml").read_text())
    res = parse_resource(doc)
    assert isinstance(res.spec, specs.ModelServingSpec)
    assert res.spec.routing.policy == "cache-aware"
    assert res.spec.budget.max_bytes == 8 * 2**30
    assert res.namespace == "default"
    pool = parse_resource(
        {"apiVersion": specs.API_VERSION, "kind": "KVCachePool", "metadata": {"name": "p"}}
    )
    assert pool.spec.hashing.contract().describe() == "blake2b-128/16"
    assert pool.spec.memory.page_bytes == 2 * 2**20


def test_parse_resource_raises_with_every_issue() -> None:
    with pytest.raises(SpecError) as info:
        parse_resource({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}, "obj")
    assert [i.path for i in info.value.issues] == ["apiVersion", "kind"]


def test_scale_subresource_and_short_names() -> None:
    pool, serving = all_crds()
    assert pool["spec"]["scope"] == "Cluster" and serving["spec"]["scope"] == "Namespaced"
    version = serving["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    names = {n for c in all_crds() for n in c["spec"]["names"]["shortNames"]}
    assert "kvcp" not in names


def _pair(pool: str, serving: str) -> tuple[specs.KVCachePoolSpec, specs.ModelServingSpec]:
    return (
        specs.KVCachePoolSpec.model_validate(yaml.safe_load(pool)),
        specs.ModelServingSpec.model_validate(yaml.safe_load(serving)),
    )


@pytest.mark.parametrize(
    "pool, engine, expect",
    [
        ("{hashing: {blockSize: 32}, memory: {backend: cpu}}", "{type: vllm}", None),
        ("{hashing: {blockSize: 16}}", "{type: vllm}", None),  # CUDA: multiples of 16
        ("{hashing: {blockSize: 24}}", "{type: vllm}", "multiple of 16; set the pool's "
         "spec.hashing.blockSize to 16"),
        ("{hashing: {blockSize: 48}, memory: {backend: cpu}}", "{type: vllm}",
         "CPU attention needs a multiple of 32; set the pool's spec.hashing.blockSize to 32"),
        ("{hashing: {blockSize: 32}}", "{type: vllm, args: [--block-size, '32']}",
         "spec.engine.args sets --block-size, which kvmarina derives for vLLM"),
        ("{hashing: {blockSize: 32}}", "{type: vllm, args: ['--kv-events-config={}']}",
         "sets --kv-events-config"),
        ("{hashing: {blockSize: 16}}", "{args: [--max-num-seqs, '4']}", None),  # reference
    ],
)  # fmt: skip
def test_a_vllm_serving_on_its_pool(pool: str, engine: str, expect: str | None) -> None:
    from kvmarina.serving import check_serving

    p, s = _pair(pool, f"{{poolRef: {{name: p}}, model: {{name: m, pvc: w}}, engine: {engine}}}")
    problems = check_serving(s, "p", p)
    if expect is None:
        assert problems == []
    else:
        assert any(expect in m for m in problems), problems


def test_vllm_presets_need_a_head_dimension_vllms_cpu_attention_takes() -> None:
    from kvmarina.serving import check_serving

    p, s = _pair(
        "{hashing: {blockSize: 32}, memory: {backend: cpu}}",
        "{poolRef: {name: p}, model: {name: m, preset: tiny}, engine: {type: vllm}}",
    )
    (problem,) = check_serving(s, "p", p)
    assert "head dimension of 16" in problem and "use preset small" in problem


def test_validate_checks_a_serving_against_a_pool_given_with_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kvmarina.validate import validate_files

    assert validate_files([str(REPO / "examples/invalid/vllm-block-size.yaml")]) == 1
    err = capsys.readouterr().err
    assert "[ModelServing/chat on KVCachePool/cpu]: KVCachePool 'cpu' names blocks of 16" in err
    assert validate_files([str(REPO / "examples/vllm-local.yaml")]) == 0


def test_tensor_parallel_needs_an_engine_that_splits_the_model() -> None:
    from kvmarina.serving import check_serving

    model = "{name: m, pvc: w, tensorParallelSize: 2}"
    p, ref = _pair("{hashing: {blockSize: 32}}", f"{{poolRef: {{name: p}}, model: {model}}}")
    (problem,) = check_serving(ref, "p", p)
    assert "tensorParallelSize is 2" in problem and "engine.type: vllm" in problem
    _, vllm = _pair("{}", f"{{poolRef: {{name: p}}, model: {model}, engine: {{type: vllm}}}}")
    assert check_serving(vllm, "p", p) == []
    from kvmarina.operator.components import vllm_args

    args = vllm_args(vllm, p, model_dir="/models")
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
