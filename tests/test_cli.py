from __future__ import annotations

from pathlib import Path

from kvmarina import __version__
from kvmarina.hashing import HashContract
from kvmarina.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parent.parent


def test_version_and_help(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("version").stdout.strip() == f"kvmarina {__version__}"
    out = cli("--help").stdout
    for cmd in ("validate", "blocks", "crds", "agent", "router", "engine", "operator", "demo"):
        assert cmd in out


def test_blocks_prints_one_hash_per_full_block(cli) -> None:  # type: ignore[no-untyped-def]
    text = "The quick brown fox jumps over the lazy dog. " * 3  # 135 bytes
    res = cli(
        "blocks", "--model-identity", "m@main", "--block-size", "16", "--salt", "t", stdin=text
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    expected = HashContract(16).block_hashes(ByteTokenizer().encode(text), "m@main", "t")
    assert len(lines) == len(expected) == 135 // 16
    assert [ln.split("\t")[1] for ln in lines] == [h.hex() for h in expected]
    assert "7 trailing tokens not hashed" in res.stderr


def test_blocks_rejects_a_bad_contract(cli) -> None:  # type: ignore[no-untyped-def]
    res = cli("blocks", "--model-identity", "m", "--algorithm", "md5", stdin="x")
    assert res.returncode == 2
    assert "allowed: blake2b, sha256" in res.stderr
    assert "Traceback" not in res.stderr


def test_validate_exit_codes(cli) -> None:  # type: ignore[no-untyped-def]
    ok = cli("validate", "-f", "examples/pool.yaml", "-f", "examples/serving.yaml")
    assert ok.returncode == 0, ok.stderr
    bad = cli("validate", "-f", "tests/core/bad/out-of-range.yaml", "-f", "examples/pool.yaml")
    assert bad.returncode == 1
    assert "spec.hashing.blockSize" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("validate", "-f", "does-not-exist.yaml")
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_crds_command_matches_files(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    res = cli("crds", "--out", str(tmp_path))
    assert res.returncode == 0
    for path in tmp_path.glob("*.yaml"):
        assert path.read_text() == (REPO / "crds" / path.name).read_text()
