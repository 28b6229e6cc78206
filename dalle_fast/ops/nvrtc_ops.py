"""The CUDA kernels of the torch.ops.dalle_fast ops through the NVRTC backend (nvrtc.py): registered for the
CUDA dispatch key when ops.support chose that backend (support.CUDA_BACKEND), so the fake kernels and
autograd of attention.py and grad_scaling.py, torch.compile and the model code see the same ops.

Each function does what the op's C++ glue does (csrc/cuda/*_glue.cpp): checks its arguments, allocates
the outputs, uploads the block layout or the multi-tensor tables (built by C++), and runs the launches
the C++ launch description gives (csrc/cuda/host_setup.h through _C) on torch's current stream.
"""

from __future__ import annotations

import math
import os

import torch

from dalle_fast import _C
from dalle_fast.ops import nvrtc
from dalle_fast.ops.masks import check_mask_args
from dalle_fast.ops.support import CUDA_BACKEND, CUDA_DTYPES, CUDA_HEAD_DIMS, CUDA_MIN_COMPUTE_CAPABILITY

_ATTENTION_DTYPE = {torch.float16: 0, torch.bfloat16: 1}  # cuda::DType
_FLOAT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # cuda::FloatKind and cuda::DecodeDType
_MAX_SCALE = 3.4028234663852886e38 / 2


def _check(ok: bool, message: str) -> None:
    """TORCH_CHECK's RuntimeError, as the nvcc build's glue raises for the same arguments."""
    if not ok:
        raise RuntimeError(f"dalle_fast: {message}")


def _check_mask(kind: str, text_len: int, image_size: int, kernel_size: int, scale: float) -> int:
    """Mask arguments and scale as the C++ glue checks them; returns the mask's seq_len."""
    try:
        check_mask_args(kind, text_len, image_size, kernel_size)
    except ValueError as e:
        raise RuntimeError(f"dalle_fast: {e}") from e
    ok = math.isfinite(scale) and abs(scale) <= _MAX_SCALE
    _check(ok, f"scale must be finite with |scale| <= 1.70141e+38, got {scale}")
    return text_len + image_size * image_size


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int) -> None:
    _check(q.dim() == 4, f"q must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(q.shape)}")
    _check(k.shape == q.shape and v.shape == q.shape, f"k and v must have the shape of q {tuple(q.shape)}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}")
    _check(k.device == q.device and v.device == q.device, "q, k and v must be on one device")
    _check(q.shape[2] == seq_len, f"q.shape[2] must be the mask's seq_len {seq_len}, got {q.shape[2]}")
    _check(q.device.type == "cuda", f"expected CUDA tensors, got {q.device}")
    _check(q.dtype in CUDA_DTYPES, f"CUDA kernels take float16 or bfloat16, got {q.dtype}")
    d = q.shape[3]
    _check(d in CUDA_HEAD_DIMS, f"head_dim (q.shape[3]) must be one of {CUDA_HEAD_DIMS} on CUDA, got {d}")
    cc, need = torch.cuda.get_device_capability(q.device), CUDA_MIN_COMPUTE_CAPABILITY
    _check(cc >= need, f"the CUDA attention kernels need compute capability {need[0]}.{need[1]}; this GPU is {cc}")


def _prepared(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels load 16 bytes at a time)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _upload(image: bytes, device: torch.device) -> torch.Tensor:
    _check(
        not torch.cuda.is_current_stream_capturing(),
        "this call uploads host data (a block layout or tensor tables), which cannot happen during CUDA graph capture",
    )
    return torch.frombuffer(bytearray(image), dtype=torch.uint8).to(device)


_layouts: dict[tuple, torch.Tensor] = {}  # (kind, text_len, image_size, kernel_size, device) -> layout_image


def _layout(kind: str, text_len: int, image_size: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    key = (kind, text_len, image_size, kernel_size if kind == "conv" else 0, device)
    if key not in _layouts:
        _layouts[key] = _upload(_C.layout_image(kind, text_len, image_size, kernel_size), device)
    return _layouts[key]


def _smem_limit(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _check_smem(need: int, limit: int, what: str, head_dim: int) -> None:
    _check(
        need <= limit,
        f"the CUDA {what} kernel for head_dim {head_dim} needs {need} bytes of shared memory per block; this GPU "
        f"allows {limit}. Use a smaller head_dim on this GPU.",
    )


def sparse_attention_fwd(q, k, v, kind, text_len, image_size, kernel_size, scale):
    n = _check_mask(kind, text_len, image_size, kernel_size, scale)
    _check_qkv(q, k, v, n)
    with torch.cuda.device(q.device):
        q, k, v = _prepared(q), _prepared(k), _prepared(v)
        dtype, d = _ATTENTION_DTYPE[q.dtype], q.shape[3]
        _check_smem(_C.attention_smem_bytes(dtype, d, _smem_limit(q.device))[0], _smem_limit(q.device), "forward", d)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        if q.numel() == 0:
            return out, lse
        layout = _layout(kind, text_len, image_size, kernel_size, q.device)
        launches = _C.forward_launches(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), layout.data_ptr(),
            q.shape[0] * q.shape[1], n, d, scale, dtype, kind, text_len, image_size, kernel_size,
        )  # fmt: skip
        nvrtc.launch(q.device, launches)
        return out, lse


def sparse_attention_bwd(grad_out, q, k, v, out, lse, kind, text_len, image_size, kernel_size, scale):
    n = _check_mask(kind, text_len, image_size, kernel_size, scale)
    _check_qkv(q, k, v, n)
    for name, t in (("grad_out", grad_out), ("out", out)):
        _check(t.shape == q.shape and t.dtype == q.dtype and t.device == q.device, f"{name} must be like q")
    _check(
        lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.device == q.device,
        f"lse must be a float32 tensor of shape {tuple(q.shape[:3])} on {q.device}",
    )
    with torch.cuda.device(q.device):
        q, k, v, g, o = (_prepared(t) for t in (q, k, v, grad_out, out))
        lse = lse.contiguous()
        dtype, d, limit = _ATTENTION_DTYPE[q.dtype], q.shape[3], _smem_limit(q.device)
        _check_smem(_C.attention_smem_bytes(dtype, d, limit)[1], limit, "backward", d)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
        if q.numel() == 0:
            return dq, dk, dv
        delta = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        layout = _layout(kind, text_len, image_size, kernel_size, q.device)
        launches = _C.backward_launches(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), o.data_ptr(), lse.data_ptr(), delta.data_ptr(),
            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), layout.data_ptr(), limit, q.shape[0] * q.shape[1], n, d,
            scale, dtype, kind, text_len, image_size, kernel_size,
        )  # fmt: skip
        nvrtc.launch(q.device, launches)
        return dq, dk, dv


def _decode_sm_count(device: torch.device) -> int:
    """As the C++ glue: DALLE_FAST_DECODE_SMS when set (1 turns key splitting off), else the device's SMs."""
    if (env := os.environ.get("DALLE_FAST_DECODE_SMS")) is not None:
        return max(1, int(env))
    return torch.cuda.get_device_properties(device).multi_processor_count


def sparse_attention_decode(q, k, v, kind, text_len, image_size, kernel_size, scale, position):
    n = _check_mask(kind, text_len, image_size, kernel_size, scale)
    _check(q.dim() == 3, f"q must be 3-D [batch, heads, head_dim] (one query per row), got shape {tuple(q.shape)}")
    _check(
        k.dim() == 4 and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[2] and v.shape == k.shape,
        f"k and v must be 4-D [batch, heads, seq_len, head_dim] = [{q.shape[0]}, {q.shape[1]}, seq_len, {q.shape[2]}]",
    )
    _check(k.dtype == q.dtype and v.dtype == q.dtype, "q, k and v must share a dtype")
    _check(k.device == q.device and v.device == q.device, "q, k and v must be on one device")
    _check(k.shape[2] == n, f"k.shape[2] must be the mask's seq_len {n}, got {k.shape[2]}")
    _check(0 <= position < n, f"position must be in [0, {n}), got {position}")
    _check(q.device.type == "cuda", f"expected CUDA tensors, got {q.device}")
    _check(q.dtype in _FLOAT_KIND, f"the CUDA decode kernel takes float32, float16 or bfloat16, got {q.dtype}")
    max_d = _C.CUDA_MAX_DECODE_HEAD_DIM
    _check(1 <= q.shape[2] <= max_d, f"head_dim (q.shape[2]) must be in [1, {max_d}] for decode, got {q.shape[2]}")
    with torch.cuda.device(q.device):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        if q.numel() == 0:
            return out
        bh, d, sms = q.shape[0] * q.shape[1], q.shape[2], _decode_sm_count(q.device)
        floats = _C.decode_workspace(kind, text_len, image_size, kernel_size, position, bh, d, sms)
        workspace = torch.empty(max(floats, 1), dtype=torch.float32, device=q.device)
        launches = _C.decode_launches(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), workspace.data_ptr(), kind, text_len,
            image_size, kernel_size, position, bh, n, d, scale, _FLOAT_KIND[q.dtype], sms,
        )  # fmt: skip
        nvrtc.launch(q.device, launches)
        return out


# ---- gradient scaling ----------------------------------------------------------------------------------------


def _check_grad(g: torch.Tensor, name: str) -> None:
    _check(g.dtype in _FLOAT_KIND, f"{name} must be float32, float16 or bfloat16, got {g.dtype}")


def _check_scales(scales: torch.Tensor, device: torch.device, found_inf: torch.Tensor | None = None) -> None:
    _check(device.type == "cuda", f"expected CUDA tensors, got {device}")
    _check(
        scales.dim() == 1 and scales.dtype == torch.float32 and scales.device == device and scales.is_contiguous(),
        f"scales must be a contiguous 1-D float32 tensor on {device}",
    )
    if found_inf is not None:
        _check(
            found_inf.shape == scales.shape and found_inf.dtype == torch.bool and found_inf.device == device
            and found_inf.is_contiguous(),
            f"found_inf must be a contiguous bool tensor of shape [{scales.shape[0]}] on {device}",
        )  # fmt: skip


def _check_block(block: int, scales: torch.Tensor, name: str) -> None:
    _check(0 <= block < scales.shape[0], f"{name} must be in [0, {scales.shape[0]}), got {block}")


def grad_scale(grad, scales, block):
    _check_grad(grad, "grad")
    _check_scales(scales, grad.device)
    _check_block(block, scales, "block")
    with torch.cuda.device(grad.device):
        g = grad.contiguous()
        out = torch.empty_like(g)
        kind = _FLOAT_KIND[g.dtype]
        launches = _C.grad_scale_launches(g.data_ptr(), out.data_ptr(), g.numel(), kind, scales.data_ptr(), block)
        nvrtc.launch(g.device, launches)
        return out


def grad_unscale_filter(grad, scales, block, found_inf):
    _check_grad(grad, "grad")
    _check_scales(scales, grad.device, found_inf)
    _check_block(block, scales, "block")
    with torch.cuda.device(grad.device):
        g = grad.contiguous()
        out = torch.empty_like(g)
        kind = _FLOAT_KIND[g.dtype]
        launches = _C.grad_unscale_filter_launches(
            g.data_ptr(), out.data_ptr(), g.numel(), kind, scales.data_ptr(), block, found_inf.data_ptr()
        )
        nvrtc.launch(g.device, launches)
        return out


def _check_list(ts, blocks, scales: torch.Tensor, name: str) -> None:
    _check(len(ts) == len(blocks), f"{name} has {len(ts)} tensors but blocks has {len(blocks)} entries")
    for i, t in enumerate(ts):
        _check_grad(t, f"{name}[{i}]")
        _check(t.device == scales.device, f"{name}[{i}] must be on {scales.device}, got {t.device}")
        _check(t.is_contiguous(), f"{name}[{i}] must be contiguous")
        _check_block(blocks[i], scales, "blocks[i]")


def _tables(lists, blocks, device: torch.device) -> tuple[torch.Tensor, int, int] | None:
    """Uploads a multi-tensor launch's tables (built by C++); None when no tensor has elements."""
    entries = [
        (tuple(t.data_ptr() for t in ts), tuple(_FLOAT_KIND[t.dtype] for t in ts), ts[0].numel(), b)
        for ts, b in zip(lists, blocks, strict=True)
    ]
    image, chunks_offset, num_chunks = _C.tensor_tables(entries)
    if num_chunks == 0:
        return None
    _check(not torch.cuda.is_current_stream_capturing(), "multi-tensor ops cannot be captured in a CUDA graph")
    host = torch.frombuffer(bytearray(image), dtype=torch.uint8).pin_memory()
    dev = host.to(device, non_blocking=True)  # the caching allocator keeps `host` until the copy is done
    return dev, chunks_offset, num_chunks


def multi_unscale_check_(grads, blocks, scales, found_inf):
    _check_scales(scales, scales.device, found_inf)
    _check_list(grads, blocks, scales, "grads")
    with torch.cuda.device(scales.device):
        keep = [i for i, g in enumerate(grads) if g.numel()]
        if (t := _tables([(grads[i],) for i in keep], [blocks[i] for i in keep], scales.device)) is None:
            return
        dev, off, num = t
        launches = _C.multi_unscale_check_launches(
            dev.data_ptr(), dev.data_ptr() + off, num, scales.data_ptr(), found_inf.data_ptr()
        )
        nvrtc.launch(scales.device, launches)


def resblock_scale_update_(scales, cooldown, found_inf, growth, backoff, window, min_scale, max_scale):
    _check_scales(scales, scales.device, found_inf)
    _check(
        cooldown.dtype == torch.int32 and cooldown.shape == scales.shape and cooldown.is_contiguous()
        and cooldown.device == scales.device,
        "cooldown must be a contiguous int32 tensor shaped like scales",
    )  # fmt: skip
    with torch.cuda.device(scales.device):
        launches = _C.scale_update_launches(
            scales.data_ptr(), cooldown.data_ptr(), found_inf.data_ptr(), scales.numel(), growth, backoff, window,
            min_scale, max_scale,
        )  # fmt: skip
        nvrtc.launch(scales.device, launches)


def adamw_step_(params, grads, exp_avg, exp_avg_sq, blocks, found_inf, step_size, bias_correction2_sqrt, decay,
                beta1, beta2, eps):  # fmt: skip
    _check_scales(step_size, step_size.device, found_inf)
    for t in (bias_correction2_sqrt, decay):
        _check(
            t.shape == step_size.shape
            and t.dtype == torch.float32
            and t.is_contiguous()
            and t.device == step_size.device,
            f"step_size, bias_correction2_sqrt and decay must be float32 tensors of shape {tuple(step_size.shape)}",
        )
    for name, ts in (("params", params), ("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_list(ts, blocks, step_size, name)
    for i, p in enumerate(params):
        _check(
            grads[i].numel() == p.numel() == exp_avg[i].numel() == exp_avg_sq[i].numel(),
            f"params[{i}], grads, exp_avg and exp_avg_sq must have the same number of elements",
        )
        _check(exp_avg_sq[i].dtype == exp_avg[i].dtype, f"exp_avg[{i}] and exp_avg_sq[{i}] must share a dtype")
    with torch.cuda.device(step_size.device):
        keep = [i for i, p in enumerate(params) if p.numel()]
        lists = [(params[i], grads[i], exp_avg[i], exp_avg_sq[i]) for i in keep]
        if (t := _tables(lists, [blocks[i] for i in keep], step_size.device)) is None:
            return
        dev, off, num = t
        launches = _C.adamw_launches(
            dev.data_ptr(), dev.data_ptr() + off, num, found_inf.data_ptr(), step_size.data_ptr(),
            bias_correction2_sqrt.data_ptr(), decay.data_ptr(), beta1, beta2, eps,
        )  # fmt: skip
        nvrtc.launch(step_size.device, launches)


IMPLS = {
    "sparse_attention_fwd": sparse_attention_fwd,
    "sparse_attention_bwd": sparse_attention_bwd,
    "sparse_attention_decode": sparse_attention_decode,
    "grad_scale": grad_scale,
    "grad_unscale_filter": grad_unscale_filter,
    "multi_unscale_check_": multi_unscale_check_,
    "resblock_scale_update_": resblock_scale_update_,
    "adamw_step_": adamw_step_,
}

_library: torch.library.Library | None = None


def register() -> None:
    """Makes these the ops' CUDA kernels (once). Over an nvcc build's own (DALLE_FAST_CUDA_BACKEND=nvrtc)
    torch warns that a kernel is overridden, which is what was asked for."""
    global _library
    if _library is None:
        _library = torch.library.Library("dalle_fast", "IMPL")
        for name, fn in IMPLS.items():
            _library.impl(name, fn, "CUDA")


if CUDA_BACKEND == "nvrtc":
    register()
