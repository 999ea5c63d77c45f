"""Write the tiny -pt and -it Gemma 3 test checkpoints: python scripts/make_tiny_checkpoints.py OUT_DIR [--seed N]."""

import argparse

from gemma_mlx.tiny import write_tiny_pair

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in write_tiny_pair(args.out_dir, args.seed).items():
        print(f"{name}: {path}")
