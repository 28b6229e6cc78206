"""pytest-benchmark entry point: `pytest benchmarks/ --benchmark-only` (not part of the test run).

Small shape, every kind, this op vs SDPA dense causal and SDPA with the boolean mask, forward and
forward+backward. benchmarks/run.py covers the paper's shape, FlexAttention, memory and the tables.
"""

import pytest
import torch

from benchmarks.common import SMALL, forward_backward_fn, forward_fn, make_impls, make_inputs
from dalle_fast import MASK_KINDS

IMPLS = ["dalle_fast", "sdpa_dense_causal", "sdpa_bool_mask"]


@pytest.fixture(autouse=True)
def _two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_forward(benchmark, kind, impl):
    q, k, v, _ = make_inputs(SMALL)
    benchmark.group = f"fwd-{kind}"
    benchmark(forward_fn(make_impls(SMALL, kind, "cpu", with_flex=False)[impl], q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_forward_backward(benchmark, kind, impl):
    q, k, v, grad = make_inputs(SMALL)
    benchmark.group = f"fwdbwd-{kind}"
    benchmark(forward_backward_fn(make_impls(SMALL, kind, "cpu", with_flex=False)[impl], q, k, v, grad))
