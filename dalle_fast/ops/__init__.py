"""The kernels' Python side: the DALL-E masks and their block layouts, the attention and decode ops,
the gradient-scaling ops, what this build supports (and the NVRTC backend, for builds without CUDA
kernels), and the device and precision policy.

Importing it loads dalle_fast._C, which registers every torch.ops.dalle_fast op (schemas in
csrc/registration.cpp); the modules here add the ops' fake kernels, autograd and plain-PyTorch
references.
"""

from dalle_fast.ops import nvrtc_ops  # noqa: F401  (registers the NVRTC backend's kernels when chosen)
from dalle_fast.ops.attention import (
    block_sparse_attention,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_decode_reference,
    sparse_attention_reference,
    to_column_order,
)
from dalle_fast.ops.masks import MASK_KINDS, BlockLayout, attention_mask, block_layout, layer_kinds, save_mask_png
from dalle_fast.ops.support import CUDA_DTYPES, CUDA_HEAD_DIMS, cpu_has_native_bf16, cuda_unusable_reason

__all__ = [
    "CUDA_DTYPES",
    "CUDA_HEAD_DIMS",
    "MASK_KINDS",
    "BlockLayout",
    "attention_mask",
    "block_layout",
    "block_sparse_attention",
    "cpu_has_native_bf16",
    "cuda_unusable_reason",
    "layer_kinds",
    "save_mask_png",
    "sparse_attention",
    "sparse_attention_decode",
    "sparse_attention_decode_reference",
    "sparse_attention_reference",
    "to_column_order",
]
