"""The DALL-E masks against the paper's examples and brute-force definitions, and the C++ block layouts
against the dense masks."""

import itertools

import pytest
import torch
from PIL import Image

from dalle_fast import MASK_KINDS, attention_mask, block_layout, layer_kinds, save_mask_png
from dalle_fast.ops.masks import plot_masks, transpose_image_index


def brute_force_mask(kind, T, W, kernel_size=11):
    """The paper's rules, one (query, key) pair at a time, in raster order."""
    n = T + W * W
    m = torch.zeros(n, n, dtype=torch.bool)
    s = kernel_size // 2
    conv_offsets = {dr * W + dc for dr in range(s + 1) for dc in range(-s, s + 1) if dr * W + dc >= 0}
    for i, j in itertools.product(range(n), range(n)):
        if j > i:
            continue
        if i < T or j < T:
            m[i, j] = True
            continue
        p, q = i - T, j - T
        m[i, j] = {
            "causal": True,
            "row": p - q <= W,
            "column": p % W == q % W,
            "conv": (p - q) in conv_offsets,
        }[kind]
    return m


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("T,W", [(6, 4), (0, 3), (5, 5), (1, 1), (3, 6)])
def test_dense_mask_matches_brute_force(kind, T, W):
    for ks in (1, 3, 11) if kind == "conv" else (11,):
        torch.testing.assert_close(attention_mask(kind, T, W, ks), brute_force_mask(kind, T, W, ks))


def image_keys(mask, T, W, r, c):
    """Image keys (as (row, col)) seen by the image query at grid (r, c)."""
    row = mask[T + r * W + c, T:]
    return {(int(x) // W, int(x) % W) for x in row.nonzero().flatten()}


def test_paper_examples_6_text_4x4():
    T, W = 6, 4
    # Every image query sees all 6 text tokens; text queries see only earlier text.
    for kind in MASK_KINDS:
        m = attention_mask(kind, T, W)
        assert m[T:, :T].all()
        assert not m[:T, T:].any()
        assert torch.equal(m[:T, :T], torch.ones(T, T, dtype=torch.bool).tril())
    # Row: the previous image_size + 1 = 5 tokens, itself included; the farthest is the same column one row up.
    assert image_keys(attention_mask("row", T, W), T, W, 2, 1) == {(1, 1), (1, 2), (1, 3), (2, 0), (2, 1)}
    # Column: the same column, rows up to its own.
    assert image_keys(attention_mask("column", T, W), T, W, 2, 1) == {(0, 1), (1, 1), (2, 1)}
    # Conv 3x3 (s = 1): offsets {0, 1} and {W-1, W, W+1} wrap around row ends.
    assert image_keys(attention_mask("conv", T, W, 3), T, W, 1, 0) == {(1, 0), (0, 3), (0, 0), (0, 1)}


def test_column_mask_on_transposed_states_is_a_band():
    T, W = 5, 4
    mt = attention_mask("column", T, W, transposed=True)
    for p in range(W * W):
        allowed = set(mt[T + p, T:].nonzero().flatten().tolist())
        assert allowed == set(range(p - p % W, p + 1))
    # The permutation is an involution and maps the raster mask onto the transposed one.
    perm = transpose_image_index(T, W)
    assert torch.equal(perm[perm], torch.arange(T + W * W))
    assert torch.equal(attention_mask("column", T, W)[perm][:, perm], mt)


def test_pair_counts_at_paper_shape():
    expected = {"causal": 819_840, "row": 328_304, "column": 311_936, "conv": 352_209}
    for kind, count in expected.items():
        assert int(attention_mask(kind, 256, 32).sum()) == count
        assert int(attention_mask(kind, 256, 32, transposed=True).sum()) == count


def test_conv_mask_has_61_image_keys_when_away_from_edges():
    T, W = 0, 32
    m = attention_mask("conv", T, W, 11)
    assert int(m[20 * W + 16].sum()) == 61


def layout_from_dense(mask, block):
    n = mask.shape[0]
    nb = (n + block - 1) // block
    out = torch.zeros(nb, nb, dtype=torch.int8)
    for qb, kb in itertools.product(range(nb), range(nb)):
        tile = mask[qb * block : (qb + 1) * block, kb * block : (kb + 1) * block]
        out[qb, kb] = 0 if not tile.any() else (2 if tile.all() else 1)
    return out


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("T,W,block", [(6, 4, 4), (7, 5, 3), (37, 9, 16), (0, 8, 8), (3, 6, 64), (256, 32, 64)])
def test_block_layout_matches_dense_mask(kind, T, W, block):
    layout = block_layout(kind, T, W, 11, block)
    dense = attention_mask(kind, T, W, transposed=kind == "column")
    assert torch.equal(layout.to_dense(), layout_from_dense(dense, block))
    # The key-major half is the transpose of the query-major half.
    nb = layout.num_blocks
    kt = torch.zeros(nb, nb, dtype=torch.int8)
    cols = torch.repeat_interleave(torch.arange(nb), layout.k_ptr.diff().long())
    kt[layout.k_qblock.long(), cols] = 1 + layout.k_full.to(torch.int8)
    assert torch.equal(kt, layout.to_dense())


def test_sparse_layouts_visit_far_fewer_blocks_than_causal():
    # At the paper's shape with 64-token blocks an image query block needs the 4 text blocks plus 2 image
    # blocks (row, column) or 4 (conv: offsets reach 5 rows back), against up to 20 for causal.
    causal = int((block_layout("causal", 256, 32, 11, 64).to_dense() > 0).sum())
    for kind, bound in (("row", 0.55), ("column", 0.55), ("conv", 0.7)):
        assert int((block_layout(kind, 256, 32, 11, 64).to_dense() > 0).sum()) < bound * causal


def test_layer_schedule():
    kinds = layer_kinds(64)
    assert len(kinds) == 64
    assert kinds[:5] == ["row", "column", "row", "row", "row"]
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert [i + 1 for i, k in enumerate(kinds) if k == "column"] == list(range(2, 64, 4))
    assert layer_kinds(1) == ["conv"]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: attention_mask("diagonal", 6, 4), "kind"),
        (lambda: attention_mask("row", -1, 4), "text_len"),
        (lambda: attention_mask("row", 6, 0), "image_size"),
        (lambda: attention_mask("row", 6, 46341), "image_size"),  # 46341**2 tokens overflow 32-bit indices
        (lambda: attention_mask("conv", 6, 4, 4), "kernel_size"),
        (lambda: block_layout("row", 6, 4, 11, 0), "block"),
        (lambda: layer_kinds(0), "n_layers"),
        (lambda: save_mask_png(torch.ones(3, 4, dtype=torch.bool), "x.png"), "square"),
    ],
)
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cpp_layout_op_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="kind"):
        torch.ops.dalle_fast.block_layout("diagonal", 6, 4, 11, 4)
    with pytest.raises(RuntimeError, match="kernel_size"):
        torch.ops.dalle_fast.block_layout("conv", 6, 4, 10, 4)
    with pytest.raises(RuntimeError, match=r"image_size must be in \[1, 46340\]"):
        torch.ops.dalle_fast.block_layout("row", 6, 46341, 11, 4)


def test_mask_pngs(tmp_path):
    paths = plot_masks(tmp_path, 6, 4)
    assert len(paths) == 5
    with Image.open(paths[0]) as img:
        assert img.size == (22 * 12 + 1, 22 * 12 + 1)
        # An allowed cell (text query 0 -> key 0) is dark, a masked one (query 0 -> key 1) is white.
        assert img.getpixel((6, 6)) != (255, 255, 255)
        assert img.getpixel((12 + 6, 6)) == (255, 255, 255)
