"""Data-parallel training with PyTorch's own engine (Section 2.5, Appendix E): torchrun, DDP, FSDP and
PowerSGD gradient compression.

`python -m dalle_fast.train dalle` runs under `torchrun --nproc_per_node N` unchanged: `init_from_env`
reads torchrun's environment and joins the process group (gloo on CPU, NCCL on CUDA). Every rank
draws the same global batch for a step (a function of seed and step) and keeps its own slice, so N
processes compute what one process computes on the whole batch (up to the order of fp32 sums).

- DDP by default. `--powersgd-rank R` registers PyTorch's PowerSGD hook (error feedback, warm start),
  by default on an fp16 copy of the gradients (the paper communicated in fp16).
  As in the paper, embeddings and unembeddings are not compressed: they are left out of DDP and their
  gradients all-reduced uncompressed by `sync_uncompressed`; gains and biases are vectors, which
  PowerSGD never compresses.
- `--shard`: FSDP (`fully_shard` per layer, then the root): parameters, gradients and optimizer state
  sharded across ranks, as the paper does within a machine.
- Per-resblock gradient scaling: scales start at replicas x 2^13 (the paper's M) and the nonfinite flags
  are agreed across ranks (`agree_found_inf`, a MAX all-reduce) so every rank skips the same blocks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only one that writes logs, samples and checkpoints."""
        return self.rank == 0


def init_from_env(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Joins torchrun's process group when WORLD_SIZE > 1; a single process otherwise. The timeout bounds
    every collective, so a rank that dies cannot leave the others waiting forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if device_type == "cuda":  # each rank on its own GPU before NCCL starts, bound to it
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


@contextlib.contextmanager
def closing_process_group():
    """Closes, on the way out of the block (returning or raising), a process group opened inside it
    (torchrun's, by init_from_env); a group that was open before is its opener's to close."""
    was_open = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not was_open and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class LossModule(nn.Module):
    """model.loss as a forward(), so DDP/FSDP see the call they hook into."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(text, image)


def uncompressed_names(model: nn.Module) -> list[str]:
    """Parameters the paper leaves out of PowerSGD: embeddings and unembeddings (the output heads)."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) or mod_name.endswith("_head"):
            names += [f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False)]
    return names


def wrap_ddp(
    model: nn.Module,
    info: DistInfo,
    device: torch.device,
    powersgd_rank: int = 0,
    start_iter: int = 2,
    fp16_comm: bool = True,
):
    """(DDP-wrapped LossModule, params synced by sync_uncompressed, PowerSGD state or None).

    fp16_comm: PowerSGD works on (and sends) an fp16 copy of the gradients, as the paper communicated in
    fp16; the result is cast back to the gradients' dtype."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    wrapper = LossModule(model)
    held_out: list[nn.Parameter] = []
    if powersgd_rank:
        names = uncompressed_names(model)
        DDP._set_params_and_buffers_to_ignore_for_model(wrapper, [f"model.{n}" for n in names])
        params = dict(model.named_parameters())
        held_out = [params[n] for n in names]
    bucket_mb = 25.0  # DDP's default
    if powersgd_rank and device.type == "cpu":
        # With gloo, PowerSGD's chained all-reduces of different buckets can interleave in a different order
        # on each rank (a collective mismatch): one bucket for everything keeps them in step.
        bucket_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1
    # broadcast_buffers=False: the model's only buffer (token positions) is a constant.
    ddp = DDP(
        wrapper,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_mb,
        broadcast_buffers=False,
    )
    state = None
    if powersgd_rank:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

        state = powersgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=start_iter,  # > 1: error feedback and warm start need a plain first step
            min_compression_rate=1.0,
            use_error_feedback=True,
            warm_start=True,
        )
        hook = finite_guard(powersgd.powerSGD_hook)
        if fp16_comm:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_wrapper

            hook = fp16_compress_wrapper(hook)
        ddp.register_comm_hook(state, hook)
    return ddp, held_out, state


def finite_guard(hook):
    """Wraps PowerSGD's DDP communication hook so that an overflow cannot poison its state.

    Under fp16 with per-resblock scaling, gradients overflow now and then by design (the scaler raises
    its scales until they do, then skips the block and backs off). PowerSGD keeps state across steps:
    error feedback (input - approximation) and the warm-start Q. An Inf that entered either would stay
    there, NaN every later step of that tensor, and keep its block skipped for good. So the guard zeroes
    the non-finite entries of the bucket before the hook sees them; repairs any non-finite state the
    hook itself produced (an fp16 product that overflowed: error feedback dropped, Q entries redrawn); and
    marks as +Inf, in the result, the entries that came in non-finite or came out so. The scaler then
    still finds the overflow and skips exactly those blocks (agreed across ranks), as without PowerSGD.
    Element-wise work only: no host synchronisation."""

    def guarded(state, bucket):
        buf = bucket.buffer()
        bad = ~torch.isfinite(buf)
        buf.masked_fill_(bad, 0.0)
        fut = hook(state, bucket)

        def restore(fut):
            out = fut.value()
            out = out[0] if isinstance(out, list) else out
            i = bucket.index()
            if i in state.error_dict:
                state.error_dict[i].nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            if i in state.q_memory_dict:
                q = state.q_memory_dict[i]
                q.copy_(torch.where(torch.isfinite(q), q, torch.randn_like(q)))
            out.masked_fill_(bad | ~torch.isfinite(out), float("inf"))
            return out

        return fut.then(restore)

    return guarded


def wrap_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: each transformer layer its own shard group, then the root (embeddings, heads)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return LossModule(model)


@torch.no_grad()
def sync_uncompressed(params: list[nn.Parameter], info: DistInfo) -> None:
    """Averages the gradients of the parameters left out of DDP: one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not info.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    torch._foreach_copy_(
        grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
    )


@torch.no_grad()
def agree_found_inf(found_inf: torch.Tensor, info: DistInfo) -> None:
    """Every rank's nonfinite flags become the OR over ranks (so all skip the same blocks), on device."""
    if info.enabled:
        flags = found_inf.to(torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        found_inf.copy_(flags.bool())


@torch.no_grad()
def mean_over_ranks(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Averages a few scalars (logged losses) over the ranks."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return (t / info.world).tolist()


def rank0_value(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's value of a number, on every rank (e.g. the seconds trained: each rank has its own clock)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def paper_compression_rate(rank: int, d_model: int) -> float:
    """The paper's compression rate for its setup: 1 - 5 r / (8 d_model)."""
    return 1.0 - 5.0 * rank / (8.0 * d_model)


def bytes_per_step(model: nn.Module, state, held_out: list[nn.Parameter], fp16_comm: bool = True) -> dict:
    """Gradient bytes each rank sends into all-reduce per step: uncompressed (fp32), and as sent with
    PowerSGD (its own count of compressed and uncompressed elements, averaged over the steps it has seen,
    at 2 bytes each with fp16 communication, plus the fp32 parameters synced outside DDP)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"uncompressed_bytes": total * 4}
    if state is not None and state.iter > state.start_powerSGD_iter:
        after = state.compression_stats()[2]
        steps = state.iter - state.start_powerSGD_iter
        extra = sum(p.numel() for p in held_out)
        out["sent_bytes"] = int(after / steps * (2 if fp16_comm else 4) + extra * 4)
        out["reduction"] = 1.0 - out["sent_bytes"] / out["uncompressed_bytes"]
    return out
