"""A separate engine-like process: lease, write known bytes, commit, then wait (or exit).

writer.py SOCKET TOKEN N MODE
MODE: exit        commit N blocks, unpin them, exit
      hold        commit N blocks, unpin them, stay connected
      lease-only  lease N slots and keep them (never answers reclaim requests)
      yield       commit N blocks and keep them pinned; on a reclaim request
                  release that many and print "RELEASED k"
"""

from __future__ import annotations

import sys
import threading
import time

from kvmarina.agent.client import AgentClient


def block_hash(i: int) -> bytes:
    """The i-th test block's hash (tests name the first 255 as ``bytes([i + 1]) * 16``)."""
    return bytes([i + 1]) * 16 if i < 255 else (i + 1).to_bytes(16, "big")


socket_path, token, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = AgentClient(socket_path, token, 4096).connect()
slots = client.lease(n)
items = []
for i, (page, index) in enumerate(slots):
    client.block(page, index).fill_((i + 1) % 256)  # write into the shared pages directly
    items.append((page, index, block_hash(i)))
if mode != "lease-only":
    client.commit(items)
if mode in ("exit", "hold"):
    client.release([h for _, _, h in items])  # unpin: cached, unreferenced
if mode == "yield":
    pinned = [h for _, _, h in items]
    lock = threading.Lock()

    def on_reclaim(k: int) -> None:
        with lock:
            give, pinned[:] = pinned[-k:], pinned[:-k]
        client.release(give)
        print(f"RELEASED {len(give)}", flush=True)

    client.watch(on_reclaim)
print("READY", flush=True)
if mode in ("hold", "lease-only", "yield"):
    time.sleep(600)
