"""The CUDA memory backend: imports without a GPU; real export/import on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from kvmarina.agent.memory import CudaRegion, RegionError, make_region


def test_cuda_backend_imports_and_explains_itself_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real test below runs instead")
    with pytest.raises(RegionError, match="cuda"):
        make_region("cuda", "t", 2 * 1024 * 1024)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_cuda_region_is_exportable_and_writable() -> None:
    region = CudaRegion("t", 4 * 1024 * 1024)
    try:
        t = region.tensor()
        t[:16].fill_(7)
        assert int(t[:16].sum()) == 7 * 16
        assert region.fd >= 0  # a POSIX fd another process can import
    finally:
        region.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_cuda_pages_shared_between_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The agent's exported device memory, imported by two engine processes."""
    from kvmarina.agent.client import AgentClient

    from .conftest import agent_process
    from .test_agent_process import run_writer

    with agent_process(tmp_path, backend="cuda") as agent:
        run_writer(agent, "tok-chat", 3, "exit").wait(30)
        reader = AgentClient(agent.socket, "tok-code", 4096).connect()
        assert reader.info["backend"] == "cuda" and reader.region is not None
        assert reader.region.device.type == "cuda"
        hashes = [bytes([i + 1]) * 16 for i in range(3)]
        hits = reader.lookup(hashes)
        assert len(hits) == 3
        for i, h in enumerate(hits):
            view = reader.block(h.page, h.index)
            assert int(view.min()) == int(view.max()) == i + 1
        reader.release(hashes)
        reader.close()
