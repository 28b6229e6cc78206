"""The DALL-E attention masks (Appendix B.1, Figure 11) and the block layouts the kernels walk.

Token order is always [text_len text tokens ; image_size**2 image tokens] (raster order). Text
queries attend causally to text; image queries attend to every text token plus the image keys of the
layer's kind:

  causal  every earlier image token (plain dense causal attention; the baseline)
  row     the previous image_size + 1 image tokens, itself included
  column  the same column, rows up to and including its own
  conv    causal convolutional attention with wraparound: with s = kernel_size // 2 and W = image_size,
          the raster offsets dr * W + dc >= 0 for 0 <= dr <= s, -s <= dc <= s (61 keys at 11x11).
          This reading of the paper's "11x11 kernel with wraparound" is the project's choice.

The dense masks here are for tests, plots and debugging. Kernels never build them: they walk a block
layout computed in C++ (csrc/layout.cpp) from per-row key intervals. Column attention runs on
TRANSPOSED image states (the paper's mask (c)), where it becomes a contiguous row-like band.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_fast import _C  # noqa: F401  (registers torch.ops.dalle_fast: block_layout)

MASK_KINDS = ("causal", "row", "column", "conv")
MAX_IMAGE_SIZE = 46340  # image_size**2 tokens fit 32-bit indices (kMaxImageSize in csrc/layout.h)


def check_mask_args(kind: str, text_len: int, image_size: int, kernel_size: int = 11) -> None:
    """Raises ValueError naming the bad argument."""
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    if not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len!r}")
    if not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int in [1, {MAX_IMAGE_SIZE}], got {image_size!r}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")


def layer_kinds(n_layers: int) -> list[str]:
    """The paper's schedule: layer i (1-based) of the first n_layers - 1 is column when
    (i - 2) % 4 == 0, else row; the last layer is conv. So: row, column, row, row, row, column, ..., conv."""
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers)]
    return kinds + ["conv"]


def transpose_image_index(text_len: int, image_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Permutation of token positions that swaps rows and columns of the image grid (text untouched).

    x[..., perm, :] turns raster states into transposed ones and back (the permutation is its own inverse).
    """
    grid = torch.arange(image_size * image_size, device=device).view(image_size, image_size)
    image = text_len + grid.t().reshape(-1)
    return torch.cat([torch.arange(text_len, device=device), image])


def _conv_radius(kernel_size: int, image_size: int) -> int:
    """The conv window's radius, at most image_size: a wider window sees no more than the whole grid
    (every earlier image token; csrc/layout.h normalize_mask_spec clamps the same way)."""
    return min(kernel_size // 2, image_size)


def attention_mask(
    kind: str, text_len: int, image_size: int, kernel_size: int = 11, *, transposed: bool = False
) -> torch.Tensor:
    """Dense [N, N] bool mask, True where query (row) may attend to key (column); N = text_len + image_size**2.

    transposed=True gives the mask on transposed image states (for "column": the paper's mask (c),
    the layout the kernels use). For tests, plots and debugging only: it is O(N^2).
    """
    check_mask_args(kind, text_len, image_size, kernel_size)
    T, W = text_len, image_size
    n = T + W * W
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    if transposed:
        perm = transpose_image_index(T, W)
        i, j = perm.view(-1, 1), perm.view(1, -1)  # evaluate the raster rule at the raster positions
    p, q = i - T, j - T  # image positions (negative for text)
    causal = j <= i
    image_pair = (p >= 0) & (q >= 0)
    if kind == "causal":
        image_ok = torch.ones_like(causal)
    elif kind == "row":
        image_ok = p - q <= W
    elif kind == "column":
        image_ok = (p % W) == (q % W)
    else:
        s = _conv_radius(kernel_size, W)
        image_ok = torch.zeros_like(causal)
        for dr in range(s + 1):
            for dc in range(-s, s + 1):
                off = dr * W + dc
                if off >= 0:
                    image_ok |= p - q == off
    return causal & (~image_pair | image_ok)


@functools.lru_cache(maxsize=1024)
def allowed_keys(kind: str, text_len: int, image_size: int, kernel_size: int, position: int) -> tuple[int, ...]:
    """The keys (ascending, kernel order) the query at kernel-order index `position` may attend to: one
    row of attention_mask(..., transposed=kind == "column"), in O(seq_len) from the same rules, never the
    N x N mask. Kernel order is raster order, except transposed image states for "column", where the
    keys are a contiguous run."""
    check_mask_args(kind, text_len, image_size, kernel_size)
    T, W = text_len, image_size
    if not isinstance(position, int) or not 0 <= position < T + W * W:
        raise ValueError(f"position must be an int in [0, {T + W * W}), got {position!r}")
    if position < T:
        return tuple(range(position + 1))
    p = position - T
    if kind == "causal":
        image = range(p + 1)
    elif kind == "row":
        image = range(max(0, p - W), p + 1)
    elif kind == "column":
        image = range(p - p % W, p + 1)
    else:
        s = _conv_radius(kernel_size, W)
        offsets = {dr * W + dc for dr in range(s + 1) for dc in range(-s, s + 1)}
        image = sorted(p - off for off in offsets if 0 <= off <= p)
    return (*range(T), *(T + q for q in image))


@dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each query block visits (CSR), and whether a visited block needs masking.

    Query-major: query block b visits key blocks q_kblock[q_ptr[b]:q_ptr[b + 1]], full where q_full.
    Key-major (its transpose, for key-parallel backward passes): k_ptr, k_qblock, k_full.
    For kind "column" the layout is on transposed image states.
    """

    block: int
    seq_len: int
    q_ptr: torch.Tensor
    q_kblock: torch.Tensor
    q_full: torch.Tensor
    k_ptr: torch.Tensor
    k_qblock: torch.Tensor
    k_full: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.q_ptr.numel() - 1

    def to_dense(self) -> torch.Tensor:
        """[num_blocks, num_blocks] int8: 0 skipped, 1 partial, 2 full (for plots and tests)."""
        nb = self.num_blocks
        dense = torch.zeros(nb, nb, dtype=torch.int8)
        rows = torch.repeat_interleave(torch.arange(nb), self.q_ptr.diff().long())
        dense[rows, self.q_kblock.long()] = 1 + self.q_full.to(torch.int8)
        return dense


@functools.lru_cache(maxsize=256)
def block_layout(kind: str, text_len: int, image_size: int, kernel_size: int = 11, block: int = 64) -> BlockLayout:
    """The block layout the kernels use (built and cached in C++; never materialises N x N)."""
    check_mask_args(kind, text_len, image_size, kernel_size)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    parts = torch.ops.dalle_fast.block_layout(kind, text_len, image_size, kernel_size, block)
    return BlockLayout(block, text_len + image_size * image_size, *parts)


def save_mask_png(mask: torch.Tensor, path: str | Path, cell: int = 12, text_len: int | None = None) -> Path:
    """Renders a [N, N] bool mask as a PNG: allowed pairs dark, text/image boundary drawn in red."""
    from PIL import Image, ImageDraw

    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square 2-D tensor, got shape {tuple(mask.shape)}")
    n = mask.shape[0]
    img = Image.new("RGB", (n * cell + 1, n * cell + 1), "white")
    draw = ImageDraw.Draw(img)
    for r, c in mask.nonzero().tolist():
        draw.rectangle([c * cell, r * cell, (c + 1) * cell, (r + 1) * cell], fill=(40, 60, 140))
    for k in range(n + 1):
        draw.line([(0, k * cell), (n * cell, k * cell)], fill=(200, 200, 200))
        draw.line([(k * cell, 0), (k * cell, n * cell)], fill=(200, 200, 200))
    if text_len:
        b = text_len * cell
        draw.line([(0, b), (n * cell, b)], fill=(220, 40, 40), width=2)
        draw.line([(b, 0), (b, n * cell)], fill=(220, 40, 40), width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def plot_masks(out_dir: str | Path, text_len: int = 6, image_size: int = 4, kernel_size: int = 11) -> list[Path]:
    """Writes one PNG per mask kind (raster order) plus column on transposed states (mask (c))."""
    out_dir = Path(out_dir)
    paths = [
        save_mask_png(
            attention_mask(k, text_len, image_size, kernel_size), out_dir / f"mask_{k}.png", text_len=text_len
        )
        for k in MASK_KINDS
    ]
    paths.append(
        save_mask_png(
            attention_mask("column", text_len, image_size, kernel_size, transposed=True),
            out_dir / "mask_column_transposed.png",
            text_len=text_len,
        )
    )
    return paths
