"""dalle_fast: DALL-E (Ramesh et al., 2021) with hand-written block-sparse attention kernels."""

import torch  # noqa: F401  (first: _C links against torch's libraries, which this import loads)

try:
    from dalle_fast import _C  # noqa: F401  (the compiled op library: registers torch.ops.dalle_fast)
except ImportError as e:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "dalle_fast's compiled ops (dalle_fast._C) could not be loaded. Install the package with "
        "`pip install --no-build-isolation -e .` into an environment that already has torch. "
        f"Original error: {e}"
    ) from e

from dalle_fast.ops import (
    MASK_KINDS,
    BlockLayout,
    attention_mask,
    block_layout,
    block_sparse_attention,
    layer_kinds,
    save_mask_png,
    sparse_attention,
    sparse_attention_decode,
    sparse_attention_reference,
    to_column_order,
)

# The one entry point from above the ops: a trained or converted dVAE run, by folder.
from dalle_fast.runs.load import load_dvae  # noqa: E402  (after _C and the ops, as everything else)

__all__ = [
    "MASK_KINDS",
    "BlockLayout",
    "attention_mask",
    "block_layout",
    "block_sparse_attention",
    "layer_kinds",
    "load_dvae",
    "save_mask_png",
    "sparse_attention",
    "sparse_attention_decode",
    "sparse_attention_reference",
    "to_column_order",
]
__version__ = "0.1.0"
