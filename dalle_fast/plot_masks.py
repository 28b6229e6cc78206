"""Renders the DALL-E attention masks to PNG: python -m dalle_fast.plot_masks --out docs"""

import argparse

from dalle_fast.ops.masks import plot_masks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs", help="output folder")
    ap.add_argument("--text-len", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=4)
    ap.add_argument("--kernel-size", type=int, default=3, help="conv kernel (11 covers a whole 4x4 grid)")
    a = ap.parse_args(argv)
    try:
        paths = plot_masks(a.out, a.text_len, a.image_size, a.kernel_size)
    except ValueError as e:
        ap.error(str(e))
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
