"""A separate engine-like process: lease, write known bytes, commit, then wait (or exit)."""

from __future__ import annotations

import sys
import time

from kvmarina.agent.client import AgentClient

socket_path, token, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = AgentClient(socket_path, token, 4096).connect()
slots = client.lease(n)
items = []
for i, (page, index) in enumerate(slots):
    client.block(page, index).fill_(i + 1)  # write into the shared pages directly
    items.append((page, index, bytes([i + 1]) * 16))
if mode != "lease-only":
    client.commit(items)
    client.release([h for _, _, h in items])  # unpin: cached, unreferenced
print("READY", flush=True)
if mode in ("hold", "lease-only"):
    time.sleep(600)
