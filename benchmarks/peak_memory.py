"""Peak extra memory of one forward+backward of one implementation, in this (fresh) process.

Prints megabytes on the last line. Called by benchmarks/run.py with a JSON config argument.
CPU (Linux): rise of the peak resident set size (VmHWM, reset just before the run) over the resident
set with inputs allocated and the code warmed up on a tiny problem.
CUDA: torch.cuda.max_memory_allocated over the same baseline.
"""

import json
import os
import sys

import torch

from benchmarks.common import Shape, forward_backward_fn, make_impls, make_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    shape, device, dtype = Shape(**cfg["shape"]), cfg["device"], DTYPES[cfg["dtype"]]
    tiny = Shape("tiny", 3, 2, 1, 1, shape.head_dim)
    # Warm up on a tiny problem so code paths and thread pools exist before the baseline.
    forward_backward_fn(
        make_impls(tiny, cfg["kind"], device, with_flex=False)[cfg["impl"]], *make_inputs(tiny, dtype, device)
    )()
    impl = make_impls(shape, cfg["kind"], device, with_flex=False)[cfg["impl"]]
    q, k, v, grad = make_inputs(shape, dtype, device)
    run = forward_backward_fn(impl, q, k, v, grad)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        # Reset the kernel's peak-RSS mark (VmHWM) so the import's own peak cannot hide this run's.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status_kib("VmRSS")
        run()
        print((status_kib("VmHWM") - base) / 1024)


if __name__ == "__main__":
    main()
