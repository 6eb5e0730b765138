"""The pool's transfer credentials: an HMAC token, and for mutual TLS a CA and one
certificate every agent of the pool presents (the agents verify peers against the
pool's CA, not host names: peers are addressed by pod IP).

Made once per pool by the openssl CLI, run as a subprocess off the event loop
(the ``cryptography`` package is not a dependency). Without openssl the pool is
reported ``Degraded`` with a message, and ``auth: token`` still works.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

DAYS = "3650"


class PKIError(RuntimeError):
    pass


async def _openssl(cwd: str, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise PKIError(f"openssl {args[0]} failed: {err.decode(errors='replace')[:200]}")


async def make_pool_pki(pool: str) -> dict[str, str]:
    """``ca.crt``, ``tls.crt``, ``tls.key`` (PEM) for the pool's agents."""
    if shutil.which("openssl") is None:
        raise PKIError("mutual TLS needs the openssl CLI in the operator image; use auth: token")
    with tempfile.TemporaryDirectory(prefix="kvmarina-pki-") as d:
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        await _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
                       "-days", DAYS, "-subj", f"/CN=kvmarina-pool-{pool}-ca")  # fmt: skip
        await _openssl(d, "req", *ec, "-keyout", "tls.key", "-out", "tls.csr",
                       "-subj", f"/CN=kvmarina-agent-{pool}")  # fmt: skip
        ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
        await asyncio.to_thread(Path(d, "ext.cnf").write_text, ext)
        await _openssl(d, "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                       "-CAcreateserial", "-out", "tls.crt", "-days", DAYS,
                       "-extfile", "ext.cnf")  # fmt: skip
        names = ("ca.crt", "tls.crt", "tls.key")
        return {f: await asyncio.to_thread(Path(d, f).read_text) for f in names}
