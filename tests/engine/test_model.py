"""The Llama decoder, its presets and the Hugging Face checkpoint loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvmarina.engine.batch import StepBatch
from kvmarina.engine.config import ModelConfig, ModelConfigError, preset
from kvmarina.engine.contiguous import ContiguousKV
from kvmarina.engine.model import LlamaForCausalLM, build_model
from kvmarina.engine.sampling import Sampler, SamplingError, SamplingParams
from kvmarina.engine.weights import WeightsError, load_model, save_checkpoint


def greedy(model: LlamaForCausalLM, prompt: list[int], steps: int, chunk: int) -> list[int]:
    """Chunked prefill then decode, through the contiguous cache."""
    kv = ContiguousKV(model.config.num_layers)
    pos = 0
    logits = None
    while pos < len(prompt):
        part = prompt[pos : pos + chunk]
        batch = StepBatch((0,), (pos,), (len(part),))
        logits = model(torch.tensor(part), batch.positions(), kv.begin(batch), batch.last_rows())
        pos += len(part)
    out = []
    assert logits is not None
    for _ in range(steps):
        tok = int(torch.argmax(logits[0]))
        out.append(tok)
        batch = StepBatch((0,), (pos,), (1,))
        logits = model(torch.tensor([tok]), batch.positions(), kv.begin(batch), batch.last_rows())
        pos += 1
    return out


def test_presets_are_deterministic_across_builds() -> None:
    a, b = build_model(preset("tiny"), seed=7), build_model(preset("tiny"), seed=7)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert not torch.equal(a.lm_head.weight, build_model(preset("tiny"), seed=8).lm_head.weight)


def test_chunked_prefill_matches_one_shot() -> None:
    model = build_model(preset("tiny"), seed=1)
    prompt = [
        int(x) for x in torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0))
    ]
    one = greedy(model, prompt, 12, chunk=len(prompt))
    assert greedy(model, prompt, 12, chunk=16) == one
    assert greedy(model, prompt, 12, chunk=7) == one


def test_batch_of_sequences_matches_each_alone() -> None:
    model = build_model(preset("tiny"), seed=2)
    p1, p2 = list(range(10, 40)), list(range(50, 61))
    kv = ContiguousKV(model.config.num_layers)
    batch = StepBatch((1, 2), (0, 0), (len(p1), len(p2)))
    logits = model(torch.tensor(p1 + p2), batch.positions(), kv.begin(batch), batch.last_rows())
    alone = []
    for p in (p1, p2):
        kv1 = ContiguousKV(model.config.num_layers)
        b = StepBatch((0,), (0,), (len(p),))
        alone.append(model(torch.tensor(p), b.positions(), kv1.begin(b), b.last_rows())[0])
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], alone[1], atol=1e-5, rtol=1e-5)


def test_hf_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model(preset("tiny"), seed=3)
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    loaded = load_model(tmp_path, None, "float32")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    prompt = list(range(30))
    assert greedy(loaded, prompt, 5, 30) == greedy(model, prompt, 5, 30)


def test_sharded_and_bf16_checkpoints_load(tmp_path: Path) -> None:
    model = build_model(preset("tiny"), seed=4)
    save_checkpoint(model, tmp_path)
    state = {k: v for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    save_file(
        {k: state[k] for k in keys[: len(keys) // 2]}, str(tmp_path / "model-00001.safetensors")
    )
    save_file(
        {k: state[k] for k in keys[len(keys) // 2 :]}, str(tmp_path / "model-00002.safetensors")
    )
    half = load_model(tmp_path, None, "bfloat16")
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_bad_checkpoints_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="does not exist"):
        load_model(tmp_path / "nope", None, "float32")
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(ModelConfigError, match=r"config\.json"):
        load_model(tmp_path, None, "float32")
    model = build_model(preset("tiny"), seed=5)
    save_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 128
    cfg["num_attention_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="shape"):
        load_model(tmp_path, None, "float32")
    with pytest.raises(ModelConfigError, match="multiple of num_kv_heads"):
        ModelConfig(10, 64, 100, 1, num_heads=4, num_kv_heads=3)
    with pytest.raises(ModelConfigError, match="unknown preset"):
        preset("huge")


def test_sampling_params_and_seeded_sampling() -> None:
    with pytest.raises(SamplingError) as e:
        SamplingParams.from_request({"temperature": 5})
    assert e.value.param == "temperature"
    for body, param in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [1]}, "stop"),
        ({"seed": "x"}, "seed"),
    ]:
        with pytest.raises(SamplingError) as e:
            SamplingParams.from_request(body)
        assert e.value.param == param
    logits = torch.randn(258, generator=torch.Generator().manual_seed(0))
    p = SamplingParams.from_request({"temperature": 0.8, "top_p": 0.9, "seed": 42})
    a = [Sampler(p).next_token(logits) for _ in range(3)]
    b = [Sampler(p).next_token(logits) for _ in range(3)]
    assert a == b
    assert Sampler(SamplingParams(temperature=0.0)).next_token(logits) == int(logits.argmax())


def test_engine_presets_match_the_core_preset_table() -> None:
    from kvmarina.engine.config import PRESETS
    from kvmarina.layout import PRESET_KV_SHAPES, preset_identity

    assert set(PRESETS) == set(PRESET_KV_SHAPES)
    for name, cfg in PRESETS.items():
        assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == PRESET_KV_SHAPES[name]
        assert (
            cfg.identity("m", "main", 16).canonical()
            == preset_identity(name, "m", "main", cfg.dtype, 16).canonical()
        )
