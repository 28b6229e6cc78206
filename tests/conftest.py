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


@pytest.fixture
def unreached():
    """unreached(mask, which, t): where a non-finite value in row t of `which` ("q", "k", "v" or "grad_out")
    must not show, if a masked key never affects an output: {"out", "dq", "dk", "dv"} -> bool [N] masks of
    the rows of each result that no visible (query, key) pair links to it. mask[i, j]: query i sees key j,
    in the order of the tensors. Rows reached: a query row t reaches itself; a key row t every query that
    sees it; gradients of keys are reached through every key a reached query sees."""

    def rows(mask: torch.Tensor, which: str, t: int) -> dict[str, torch.Tensor]:
        if which in ("q", "grad_out"):
            reached = torch.zeros(mask.shape[0], dtype=torch.bool)
            reached[t] = True
        else:
            reached = mask[:, t].clone()
        keys = mask[reached].any(0)
        out = torch.zeros_like(reached) if which == "grad_out" else reached  # the output never reads grad_out
        return {"out": ~out, "dq": ~reached, "dk": ~keys, "dv": ~keys}

    return rows
