"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture
def pretend_gpu(monkeypatch):
    """pretend_gpu(capability=(9, 0)): from then on the device checks see one CUDA device of that compute
    capability and a build with CUDA kernels (ops.cuda_unusable_reason, the trainers' and the sampler's
    device choices); nothing may touch the device itself."""
    from dalle_fast.ops import support as ops

    def pretend(capability: tuple[int, int] = (9, 0)) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(ops, "_HAS_CUDA_KERNEL", dict.fromkeys(ops._HAS_CUDA_KERNEL, True))

    return pretend
