"""Block migration between two agent processes on loopback, beside its ceilings.

Moves ``--gib`` GiB of 2 MiB blocks from agent A to agent B with a real pull
(token authentication on, xxh3 checksums verified), then again over mutual TLS
(certificates made with the openssl CLI; skipped without it). Baselines in the
same run: ``ceiling_gbps``, a plain TCP copy of the same bytes between two
processes, and ``memcpy_gbps``. Target: ``ratio = gbps / ceiling_gbps >= 0.6``.

    python benchmarks/migration.py [--gib 1.0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, report, time_runs

from kvmarina.agent.client import AgentClient

BLOCK = 2 * 1024 * 1024
SINK = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytearray(1 << 22); mv = memoryview(buf); n = 0
while True:
    k = c.recv_into(mv)
    if not k: break
    n += k
print(n, flush=True)
"""


def tcp_ceiling(nbytes: int) -> float:
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    data = memoryview(bytes(BLOCK))
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.perf_counter()
    for _ in range(nbytes // BLOCK):
        s.sendall(data)
    s.close()
    sink.stdout.readline()
    sink.wait(30)
    return nbytes / (time.perf_counter() - t0) / 1e9


def make_certs(d: Path) -> bool:
    if shutil.which("openssl") is None:
        return False

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=kvmarina-bench-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
        "-subj",
        "/CN=agent",
    )
    run(
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "tls.crt",
        "-days",
        "1",
    )
    return True


def start_agent(
    d: Path, name: str, size: int, auth: str, cert_dir: Path | None
) -> tuple[subprocess.Popen[str], str, str]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "creds.json").write_text(
        json.dumps({"servings": [{"name": "s", "namespace": "n", "token": "serving-token"}]})
    )
    (d / "transfer.token").write_text("bench-transfer-token-0123456789")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    cfg = {
        "node": name,
        "socket_path": str(d / "a.sock"),
        "http_port": http_port,
        "device_bytes": size,
        "page_size": BLOCK,
        "credentials_file": str(d / "creds.json"),
        "migration": {
            "port": 0,
            "host": "127.0.0.1",
            "auth": auth,
            "timeout_s": 60,
            "token_file": str(d / "transfer.token"),
            "cert_dir": str(cert_dir) if cert_dir else None,
        },
    }
    (d / "agent.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmarina.cli", "agent", "--config", str(d / "agent.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc, str(d / "a.sock"), f"http://127.0.0.1:{http_port}"


def migrate(tmp: Path, nbytes: int, auth: str, cert_dir: Path | None) -> float:
    size = nbytes + 8 * BLOCK
    a, sock_a, url_a = start_agent(tmp / f"a-{auth}", "a", size, auth, cert_dir)
    b, sock_b, _ = start_agent(tmp / f"b-{auth}", "b", size, auth, cert_dir)
    try:
        writer = AgentClient(sock_a, "serving-token", BLOCK).connect()
        n = nbytes // BLOCK
        slots = writer.lease(n)
        hashes = [i.to_bytes(16, "little") for i in range(n)]
        for (p, i), h in zip(slots, hashes, strict=True):
            writer.block(p, i).fill_(h[0])
        writer.commit([(p, i, h) for (p, i), h in zip(slots, hashes, strict=True)])
        writer.release(hashes)
        reader = AgentClient(sock_b, "serving-token", BLOCK, timeout=300).connect()
        t0 = time.perf_counter()
        reply = reader.call({"op": "pull", "peer": url_a, "hashes": hashes})
        elapsed = time.perf_counter() - t0
        assert reply["pulled"] == n, reply
        hit = reader.lookup(hashes[-1:])[0]
        assert int(reader.block(hit.page, hit.index)[0]) == hashes[-1][0]  # verified bytes
        return nbytes / elapsed / 1e9
    finally:
        for p in (a, b):
            p.terminate()
            p.wait(20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    args = ap.parse_args()
    nbytes = int(args.gib * 1024**3) // BLOCK * BLOCK
    tmp = Path(tempfile.mkdtemp(prefix="kvm-migration-"))
    try:
        gbps = migrate(tmp, nbytes, "token", None)
        certs = tmp / "certs"
        certs.mkdir()
        gbps_tls = migrate(tmp, nbytes, "mtls", certs) if make_certs(certs) else None
        ceiling = tcp_ceiling(nbytes)
        src = torch.empty(nbytes // 8, dtype=torch.uint8)
        dst = torch.empty_like(src)
        memcpy = src.numel() / median(time_runs(lambda: dst.copy_(src), 5)) / 1e9
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "gbps": round(gbps, 3),
        "gbps_tls": round(gbps_tls, 3) if gbps_tls else None,
        "ceiling_gbps": round(ceiling, 3),
        "memcpy_gbps": round(memcpy, 2),
        "ratio": round(gbps / ceiling, 3),
        "bytes": nbytes,
        "target_ratio": 0.6,
    }
    report(
        [
            ("figure", "GB/s", "note"),
            (
                "agent pull (token, xxh3)",
                str(result["gbps"]),
                f"{nbytes >> 20} MiB of 2 MiB blocks",
            ),
            ("agent pull (mutual TLS)", str(result["gbps_tls"]), "openssl certs"),
            ("plain TCP copy (ceiling)", str(result["ceiling_gbps"]), "same bytes, two processes"),
            ("memcpy", str(result["memcpy_gbps"]), "torch copy"),
            ("ratio", str(result["ratio"]), "target >= 0.6"),
        ],
        result,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
