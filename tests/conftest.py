"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture
def pretend_gpu(monkeypatch):
    """pretend_gpu(capability=(9, 0)): from then on the device checks see one CUDA device of that compute
    capability and CUDA kernels from the nvcc build (ops.cuda_unusable_reason, the trainers' and the
    sampler's device choices); nothing may touch the device itself."""
    from dalle_fast.ops import support as ops

    def pretend(capability: tuple[int, int] = (9, 0)) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(ops, "CUDA_BACKEND", "nvcc")

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


@pytest.fixture(scope="session")
def train_micro_runs():
    """train_micro_runs(root, **dalle): see _train_micro_runs."""
    return _train_micro_runs


def _train_micro_runs(root, **dalle):
    """A dVAE (root/vae), a micro transformer (root/dalle; `dalle` overrides its config) and a CLIP run
    (root/clip), each trained for two updates: what the sampling and serving tests draw from."""
    from dalle_fast.training.clip import CLIPTrainConfig, train_clip
    from dalle_fast.training.dalle import DALLETrainConfig, train_dalle
    from dalle_fast.training.vae import VAETrainConfig, train_vae

    train_vae(VAETrainConfig(out=str(root / "vae"), steps=2, batch_size=4, ckpt_every=2, log_every=2, eval_images=8))
    train_dalle(DALLETrainConfig(**{
        "vae": str(root / "vae"), "out": str(root / "dalle"), "preset": "micro", "steps": 2, "batch_size": 4,
        "ckpt_every": 2, "log_every": 2, "max_items": 32, "val_items": 8, "samples": 0, "warmup": 1,
        "bpe_variants": 0, "vocab_size": 300, "text_len": 24, "device": "cpu", **dalle,
    }))  # fmt: skip
    train_clip(CLIPTrainConfig(
        dalle=str(root / "dalle"), out=str(root / "clip"), width=16, embed_dim=8, max_items=32, val_items=8,
        steps=2, batch_size=8, ckpt_every=2,
    ))  # fmt: skip
    return root
