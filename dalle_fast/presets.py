"""The transformer presets' sizes and mask schedules: python -m dalle_fast.presets [PRESET]."""

from __future__ import annotations

import argparse

import torch

from dalle_fast.models.transformer import DALLE, PRESETS


def main(argv: list[str] | None = None) -> int:
    """`python -m dalle_fast.presets [PRESET]`: builds a transformer preset on the meta device (no memory)
    and prints its size and layer schedule."""
    ap = argparse.ArgumentParser(prog="python -m dalle_fast.presets", description=main.__doc__)
    ap.add_argument("preset", nargs="?", default="paper", choices=sorted(PRESETS))
    args = ap.parse_args(argv)
    with torch.device("meta"):
        model = DALLE(PRESETS[args.preset])
    cfg = model.cfg
    kinds = cfg.layer_kinds()
    n = model.num_params()
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    print(
        f"{args.preset}: {size} parameters; {cfg.n_layers} layers x {cfg.n_heads} heads of "
        f"{cfg.head_dim}, d_model {cfg.d_model}; {cfg.text_len} text + {cfg.image_size}x{cfg.image_size} image tokens; "
        f"masks: {', '.join(f'{k} x{kinds.count(k)}' for k in dict.fromkeys(kinds))}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
