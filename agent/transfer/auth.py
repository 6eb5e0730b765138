"""Who may move blocks: the pool's transfer token (HMAC challenge-response) and mutual TLS.

Both sides prove they hold the token without sending it: each picks a nonce and
answers with ``HMAC-SHA256(token, role | client nonce | server nonce)``, so a
recorded handshake is useless against a fresh nonce. With a certificate
directory the socket is mutual TLS first (the pool's own CA), and the token
handshake runs inside it. Everything here is blocking and runs in worker
threads, never on the agent's event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
from pathlib import Path

from kvmarina.agent.transfer.wire import TransferError, recv_frame, send_frame

MIN_TOKEN = 16
__all__ = ["TransferError", "client_handshake", "load_token", "server_handshake", "tls_contexts"]


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"|".join(parts), hashlib.sha256).digest()


def load_token(path: str | None) -> bytes:
    if path is None:
        raise TransferError("migration needs a token file (migration.token_file)")
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise TransferError(f"cannot read the transfer token {path}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN:
        raise TransferError(f"the transfer token in {path} is too short (< {MIN_TOKEN} bytes)")
    return token


def tls_contexts(cert_dir: str | None) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) contexts for mutual TLS, or (None, None) when TLS is off."""
    if not cert_dir:
        return None, None
    d = Path(cert_dir)
    ca, crt, key = d / "ca.crt", d / "tls.crt", d / "tls.key"
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    server.load_cert_chain(str(crt), str(key))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    client.load_cert_chain(str(crt), str(key))
    client.check_hostname = False  # peers are addressed by IP; the CA is the pool's own
    return server, client


def client_handshake(sock: socket.socket, token: bytes, node: str, peer: str) -> None:
    """Prove the token to the server and check that it holds it too; raises otherwise."""
    nonce_c = os.urandom(16)
    send_frame(sock, {"nonce": nonce_c, "node": node})
    challenge = recv_frame(sock)
    if not isinstance(challenge, dict) or not isinstance(challenge.get("nonce"), bytes):
        raise TransferError(f"peer {peer} sent no transfer-token challenge")
    mac = challenge.get("mac")
    if not isinstance(mac, bytes) or not hmac.compare_digest(
        mac, _mac(token, b"server", nonce_c, challenge["nonce"])
    ):
        raise TransferError(f"peer {peer} failed to prove the transfer token")
    send_frame(sock, {"mac": _mac(token, b"client", nonce_c, challenge["nonce"])})
    verdict = recv_frame(sock)
    if not (isinstance(verdict, dict) and verdict.get("ok") is True):
        raise TransferError(f"peer {peer} refused our transfer token")


def server_handshake(sock: socket.socket, token: bytes) -> bool:
    """Challenge a connecting peer; True only when it proved the token.

    The server's own proof is sent before the client's is checked: the client
    learns nothing it could replay (its nonce is fresh), and a peer without the
    token gets a refusal and no data."""
    hello = recv_frame(sock)
    if not isinstance(hello, dict) or not isinstance(hello.get("nonce"), bytes):
        return False
    nonce_s = os.urandom(16)
    send_frame(sock, {"nonce": nonce_s, "mac": _mac(token, b"server", hello["nonce"], nonce_s)})
    proof = recv_frame(sock)
    want = _mac(token, b"client", hello["nonce"], nonce_s)
    ok = (
        isinstance(proof, dict)
        and isinstance(proof.get("mac"), bytes)
        and hmac.compare_digest(proof["mac"], want)
    )
    send_frame(sock, {"ok": ok})
    return ok
