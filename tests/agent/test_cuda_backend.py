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
