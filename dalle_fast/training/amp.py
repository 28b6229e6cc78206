"""Per-resblock gradient scaling (the paper's Section 2.4 and Appendix D, Figure 4).

One gradient scale per resblock instead of one loss scale. In backward, the gradient entering a
resblock's branch f is multiplied by that block's scale; the gradient leaving f is unscaled and
filtered (Inf/NaN -> 0) before it joins the identity path, which stays fp32. So an overflow inside one
block cannot wipe out the gradient of every block before it, and each block's scale can sit as high as
its own gradients allow.

    scaler = ResblockGradScaler(num_blocks=len(blocks), replicas=world_size)
    model.blocks = nn.ModuleList(scaler.residual(f, i) for i, f in enumerate(branches))   # x + f(x)
    opt = BlockAdamW(scaler.param_groups(model), scaler, lr=4.5e-4, betas=(0.9, 0.96), weight_decay=4.5e-2)
    loss.backward()
    scaler.unscale_(opt)   # one pass over all grads: unscale by the block's scale, flag Inf/NaN per block
    opt.step()             # skips exactly the flagged blocks, on device, without a host sync
    scaler.update()        # the paper's rules: x 2^(1/1000), or / sqrt(2) at most once per 125 updates

Block index num_blocks (one past the last resblock) is the "outside" group: parameters not inside any
resblock branch (embeddings, final layers). Its gradients are not scaled (scale fixed at 1), but they
are checked, and the group is skipped when they are not finite.

The per-element work is custom ops (dalle_fast.ops.grad_scaling: kernels, references, fakes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dalle_fast.ops.grad_scaling import (
    BACKOFF,
    GROWTH,
    INIT_EXP,
    MAX_EXP,
    MIN_EXP,
    WINDOW,
    ScaleGradIn,
    UnscaleGradOut,
)


class ScaledResidual(nn.Module):
    """x + branch(x), with the branch's gradient scaled by its block's scale (see the module docstring).

    `branch` is the f of a resblock x + f(x): any module mapping x to a tensor of x's shape. Its
    parameters belong to block `index` of the scaler.
    """

    def __init__(self, branch: nn.Module, index: int, scaler: ResblockGradScaler):
        super().__init__()
        if not 0 <= index < scaler.num_blocks:
            raise ValueError(f"index must be in [0, {scaler.num_blocks}), got {index}")
        self.branch = branch
        self.index = index
        self._scaler = [scaler]  # a list, so the scaler is not registered as a submodule

    def forward(self, x: torch.Tensor, **cache) -> torch.Tensor:
        """cache: passed on to the branch (the model's key/value cache while sampling)."""
        s = self._scaler[0]
        if not torch.is_grad_enabled():
            return x + self.branch(x, **cache)
        inner = UnscaleGradOut.apply(x, s._scales, self.index, s.found_inf)
        # The branch's output joins the stream in x's dtype (fp32) before the scale: under fp16 autocast the
        # branch returns fp16, and autograd would otherwise round the stream's gradient to fp16 (flushing
        # what lies below fp16's range) before the scale could lift it.
        return x + ScaleGradIn.apply(self.branch(inner, **cache).to(x.dtype), s._scales, self.index)


# ---- the scaler -------------------------------------------------------------------------------------


class ResblockGradScaler:
    """One gradient scale per resblock, updated by the paper's rules on the training device.

    scales: fp32 [num_blocks]. found_inf: bool [num_blocks + 1], set during backward (by the resblock
    boundaries) and by unscale_ (per parameter block); the last entry is the outside group.
    """

    def __init__(self, num_blocks: int, replicas: int = 1, device: torch.device | str | None = None):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
        self.num_blocks = num_blocks
        self.replicas = replicas
        self.min_scale = float(replicas * 2.0**MIN_EXP)
        self.max_scale = float(replicas * 2.0**MAX_EXP)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # The outside group's scale sits after the blocks' and stays 1.
        self._scales = torch.full((num_blocks + 1,), float(replicas * 2.0**INIT_EXP), device=dev)
        self._scales[-1] = 1.0
        self.cooldown = torch.zeros(num_blocks, dtype=torch.int32, device=dev)
        self.found_inf = torch.zeros(num_blocks + 1, dtype=torch.bool, device=dev)

    @property
    def scales(self) -> torch.Tensor:
        """fp32 [num_blocks] (a view: updated in place)."""
        return self._scales[: self.num_blocks]

    @property
    def device(self) -> torch.device:
        return self._scales.device

    def residual(self, branch: nn.Module, index: int) -> ScaledResidual:
        """Wraps the branch f of resblock `index` as x + f(x) with per-block gradient scaling."""
        return ScaledResidual(branch, index, self)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer param groups, one per block, from the ScaledResidual modules inside `model`;
        every other trainable parameter goes to the outside group (index num_blocks)."""
        groups: dict[int, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for mod in model.modules():
            if isinstance(mod, ScaledResidual) and mod._scaler[0] is self:
                for p in mod.branch.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        groups.setdefault(mod.index, []).append(p)
        outside = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
        if outside:
            groups[self.num_blocks] = outside
        return [{"params": ps, "block": b} for b, ps in sorted(groups.items())]

    def unscale_(self, params_by_block: Iterable[tuple[torch.Tensor, int]] | torch.optim.Optimizer) -> None:
        """Unscales every gradient by its block's scale and flags Inf/NaN per block: one fused pass.

        Takes an optimizer whose param groups carry "block" (see param_groups), or (param, block) pairs.
        """
        if isinstance(params_by_block, torch.optim.Optimizer):
            pairs = [(p, g["block"]) for g in params_by_block.param_groups for p in g["params"]]
        else:
            pairs = list(params_by_block)
        grads, blocks = [], []
        for p, b in pairs:
            if not 0 <= b <= self.num_blocks:
                raise ValueError(f"block index must be in [0, {self.num_blocks}], got {b}")
            if p.grad is not None:
                if p.grad.dtype == torch.float16:
                    raise ValueError(
                        "unscale_ got float16 gradients: unscaling them in place would underflow them again; keep "
                        "parameters (and so gradients) in float32 or bfloat16 and run the branches in fp16"
                    )
                if not p.grad.is_contiguous():  # e.g. a transposed or channels-last gradient: the fused
                    p.grad = p.grad.contiguous()  # pass works in place on dense rows, so it gets one
                grads.append(p.grad)
                blocks.append(b)
        if grads:
            torch.ops.dalle_fast.multi_unscale_check_(grads, blocks, self._scales, self.found_inf)

    def update(self, found_inf: torch.Tensor | None = None) -> None:
        """Applies the scale rules for one update, then clears the flags.

        found_inf: bool [num_blocks] (default: the flags gathered since the last update)."""
        flags = self.found_inf[: self.num_blocks] if found_inf is None else found_inf
        if flags.shape != (self.num_blocks,) or flags.dtype != torch.bool:
            raise ValueError(
                f"found_inf must be a bool tensor of shape [{self.num_blocks}], got {flags.dtype} {tuple(flags.shape)}"
            )
        torch.ops.dalle_fast.resblock_scale_update_(
            self.scales, self.cooldown, flags.to(self.device), GROWTH, BACKOFF, WINDOW, self.min_scale, self.max_scale
        )
        self.found_inf.zero_()

    def state_dict(self) -> dict:
        return {
            "scales": self.scales.clone(),
            "cooldown": self.cooldown.clone(),
            "num_blocks": self.num_blocks,
            "replicas": self.replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("scales", "cooldown", "num_blocks", "replicas"):
            if key not in state:
                raise ValueError(f"state_dict is missing {key!r}")
        if state["num_blocks"] != self.num_blocks or state["replicas"] != self.replicas:
            raise ValueError(
                f"state_dict is for num_blocks={state['num_blocks']}, replicas={state['replicas']}; this scaler "
                f"has num_blocks={self.num_blocks}, replicas={self.replicas}"
            )
        self.scales.copy_(state["scales"])
        self.cooldown.copy_(state["cooldown"])


# ---- the optimizer ----------------------------------------------------------------------------------


class BlockAdamW(torch.optim.Optimizer):
    """AdamW that skips exactly the blocks whose gradients were not finite, on device, with no host sync.

    Param groups carry a "block" index (ResblockGradScaler.param_groups). A skipped block's parameters,
    moments and step count stay unchanged. Decoupled weight decay as in torch.optim.AdamW.
    """

    def __init__(
        self,
        params,
        scaler: ResblockGradScaler,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for g in self.param_groups:
            if "block" not in g or not 0 <= g["block"] <= scaler.num_blocks:
                raise ValueError(f"every param group needs a 'block' in [0, {scaler.num_blocks}]")
        if len({g["betas"] for g in self.param_groups}) > 1 or len({g["eps"] for g in self.param_groups}) > 1:
            raise ValueError("BlockAdamW needs the same betas and eps in every param group")
        self.scaler = scaler
        # Per-block step counts live on the device, so skipping a block needs no host decision.
        self.block_steps = torch.zeros(scaler.num_blocks + 1, dtype=torch.float32, device=scaler.device)

    def _block_factors(self):
        """Per-block step_size, sqrt(1 - beta2^t) and decay (1 - lr * wd), as fp32 device tensors."""
        key = tuple((g["block"], g["lr"], g["weight_decay"]) for g in self.param_groups)
        if getattr(self, "_hyper_key", None) != key:  # re-upload only when a learning rate changes
            nb = self.scaler.num_blocks + 1
            lr = torch.zeros(nb, dtype=torch.float32)
            decay = torch.ones(nb, dtype=torch.float32)
            for g in self.param_groups:
                lr[g["block"]] = g["lr"]
                decay[g["block"]] = 1.0 - g["lr"] * g["weight_decay"]
            dev = self.block_steps.device
            if dev.type == "cuda":  # pinned + non_blocking: no host synchronisation
                lr, decay = lr.pin_memory(), decay.pin_memory()
            self._lr = lr.to(dev, non_blocking=True)
            self._decay = decay.to(dev, non_blocking=True)
            self._hyper_key = key
        beta1, beta2 = self.param_groups[0]["betas"]
        t = self.block_steps
        step_size = self._lr / (1.0 - torch.pow(beta1, t))
        bc2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt()
        return step_size, bc2_sqrt, self._decay

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("BlockAdamW.step takes no closure")
        found = self.scaler.found_inf
        self.block_steps.add_((~found).float())
        step_size, bc2_sqrt, decay = self._block_factors()
        params, grads, ms, vs, blocks = [], [], [], [], []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                params.append(p)
                grads.append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
                blocks.append(g["block"])
        if params:
            beta1, beta2 = self.param_groups[0]["betas"]
            torch.ops.dalle_fast.adamw_step_(
                params,
                grads,
                ms,
                vs,
                blocks,
                found,
                step_size,
                bc2_sqrt,
                decay,
                beta1,
                beta2,
                self.param_groups[0]["eps"],
            )

    def state_dict(self):
        sd = super().state_dict()
        sd["block_steps"] = self.block_steps.clone()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        steps = state_dict.pop("block_steps", None)
        if steps is None or steps.shape != self.block_steps.shape:
            raise ValueError(f"state_dict needs block_steps of shape {tuple(self.block_steps.shape)}")
        super().load_state_dict(state_dict)
        self.block_steps.copy_(steps)


@torch.no_grad()
def clip_grad_norm_finite_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clips the total gradient norm to max_norm, leaving nonfinite gradients out of the norm (those
    blocks are skipped by the optimizer anyway), without a host sync. Returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads)).float()
    total = torch.where(norms.isfinite(), norms, torch.zeros_like(norms)).norm()
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    return total
