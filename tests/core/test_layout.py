from __future__ import annotations

import pytest

from kvmarina.layout import KVLayout, LayoutError, ModelIdentity


def test_bytes_per_token_block_page() -> None:
    lay = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16", block_size=16)
    assert lay.bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert lay.bytes_per_block == 131072 * 16 == 2 * 1024 * 1024
    assert lay.blocks_per_page(2 * 1024 * 1024) == 1
    assert lay.blocks_per_page(8 * 1024 * 1024) == 4
    assert lay.pages_for_blocks(9, 8 * 1024 * 1024) == 3
    assert lay.bytes_per_block_per_layer * 32 == lay.bytes_per_block


def test_page_too_small_is_explained() -> None:
    lay = KVLayout(32, 8, 128, "float32", 16)
    with pytest.raises(LayoutError, match="cannot hold one block"):
        lay.blocks_per_page(2 * 1024 * 1024)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"head_dim": -1}, "head_dim"),
        ({"dtype": "float64"}, "allowed"),
        ({"block_size": True}, "block_size"),
    ],
)
def test_bad_layouts(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    with pytest.raises(LayoutError, match=match):
        KVLayout(**{**base, **kwargs})  # type: ignore[arg-type]


def test_dict_round_trip_and_errors() -> None:
    lay = KVLayout(4, 2, 64, "bfloat16", 32)
    assert KVLayout.from_dict(lay.to_dict()) == lay
    with pytest.raises(LayoutError, match="missing 'head_dim'"):
        KVLayout.from_dict({"num_layers": 1, "num_kv_heads": 1})


def test_identity_is_canonical_and_distinguishes() -> None:
    lay = KVLayout(4, 2, 64, "float16", 16)
    a = ModelIdentity("llama", lay, "main")
    assert a.canonical() == "llama@main|L4/H2/D64/float16/B16|tp0of1"
    others = {
        ModelIdentity("llama", lay, "v2").canonical(),
        ModelIdentity("llama", KVLayout(4, 2, 64, "bfloat16", 16)).canonical(),
        ModelIdentity("llama", lay, tp_size=2, tp_rank=1).canonical(),
    }
    assert a.canonical() not in others and len(others) == 3
    with pytest.raises(LayoutError, match="rank"):
        ModelIdentity("llama", lay, tp_size=2, tp_rank=2)


def test_quantities_and_sizes() -> None:
    from kvmarina.quantity import QuantityError, format_bytes, parse_bytes, parse_size

    assert parse_bytes("2Mi") == 2 * 2**20 and parse_bytes("1.5G") == 1_500_000_000
    assert parse_bytes(4096) == 4096 and format_bytes(2 * 2**20) == "2Mi"
    assert parse_size("10GiB") == 10 * 2**30 and parse_size("512MB") == 512 * 10**6
    assert parse_size("2Mi") == 2 * 2**20 and parse_size("1kb") == 1000 and parse_size(7) == 7
    for bad in ("lots", "-1Gi", "1 GiBs", "", "1e9"):
        with pytest.raises(QuantityError, match="not a"):
            parse_size(bad)
    with pytest.raises(QuantityError, match="negative"):
        parse_bytes(-5)
