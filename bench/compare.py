#!/usr/bin/env python3
"""Runs candle (`deepmad bench`) and PyTorch (`bench/torch_bench.py`) on the same designs, on
the same device, in one run, and prints images/s and the ratios as a Markdown table.

  python3 bench/compare.py --deepmad target/release/deepmad --device cpu --threads 2 \
      --batch 128,512 --steps 10 bench/designs/*.json

Each side prints JSON lines; they are joined on (design, batch). The raw lines are kept with
--raw FILE. PyTorch must be importable (see bench/README.md); --no-torch measures candle only.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_lines(command, env=None):
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"command failed with status {done.returncode}: {' '.join(command)}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("designs", nargs="*", help="deepmad architecture JSON files")
    parser.add_argument("--deepmad", default="target/release/deepmad",
                        help="the deepmad binary (a command line: a wrapper may come first)")
    parser.add_argument("--python", default=sys.executable, help="Python with PyTorch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", default="128", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads for both frameworks")
    parser.add_argument("--kernels", default="both", help="deepmad, stock or both")
    parser.add_argument("--no-torch", action="store_true", help="measure candle only")
    parser.add_argument("--sync-each-step", action="store_true",
                        help="both frameworks wait for the device after every step (reading "
                             "the loss); by default both wait once, after the timed loop")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each design this many times, candle and PyTorch back to "
                             "back per design and round; the table shows medians and the range "
                             "of the per-round ratios (for machines whose speed drifts)")
    parser.add_argument("--raw", help="also write every JSON line to this file")
    parser.add_argument("--from", dest="sources", nargs="+", metavar="JSONL",
                        help="measure nothing: tabulate JSON lines saved earlier (by --raw, "
                             "`deepmad bench --json` or `torch_bench.py --json`)")
    args = parser.parse_args()
    if args.sources:
        rows = [json.loads(line) for source in args.sources
                for line in Path(source).read_text().splitlines() if line.startswith("{")]
        print_table(rows, args)
        return
    if not args.designs:
        parser.error("name design files (or --from JSONL files to tabulate)")

    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    common = ["--device", args.device, "--batch", args.batch, "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.sync_each_step:
        common.append("--sync-each-step")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    torch_common = ["--device", device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.sync_each_step:
        torch_common.append("--sync-each-step")
    for batch in args.batch.split(","):
        torch_common += ["--batch", batch]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # One round: all designs at once (the default, one process per framework), or with
    # --rounds, design by design so that each candle/PyTorch pair runs back to back.
    groups = [args.designs] if args.rounds == 1 else [[design] for design in args.designs]
    rows = []
    for round_index in range(args.rounds):
        for designs in groups:
            measured = run_lines([*shlex.split(args.deepmad), "bench", *designs, *common,
                                  *threads, "--kernels", args.kernels, "--json"])
            if not args.no_torch:
                flags = [arg for design in designs for arg in ("--design", design)]
                measured += run_lines([args.python, str(HERE / "torch_bench.py"), *flags,
                                       *torch_common, *threads, "--mode", "all", "--json"],
                                      env=env)
            for row in measured:
                row["round"] = round_index
            rows += measured
    if args.raw:
        Path(args.raw).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print_table(rows, args)


def print_table(rows, args):
    def column(row):
        # Rows that waited for the device after every step are their own columns.
        sync = " sync" if row.get("sync_each_step") else ""
        if row["framework"] == "candle":
            return f"candle {row['kernels']}{sync}"
        return f"pytorch {row['mode']}{sync}"

    samples = {}
    columns = []
    params = {}
    for row in rows:
        key = (row["design"], int(row["batch"]))
        samples.setdefault(key, {}).setdefault(column(row), []).append(
            (row.get("round", 0), row["images_per_s"]))
        params.setdefault(row["design"], {})[row["framework"]] = row["params"]
        if column(row) not in columns:
            columns.append(column(row))
    table = {key: {c: statistics.median(v for _, v in values) for c, values in cells.items()}
             for key, cells in samples.items()}
    rounds = max((len(values) for cells in samples.values() for values in cells.values()),
                 default=1)
    header = ["design", "batch", *columns]
    ratios = []
    for sync in ("", " sync"):
        for name, top, bottom in (("deepmad / pytorch fp32", "candle deepmad", "pytorch fp32"),
                                  ("deepmad / pytorch bf16-cl", "candle deepmad",
                                   "pytorch bf16-cl"),
                                  ("deepmad / stock", "candle deepmad", "candle stock")):
            if top + sync in columns and bottom + sync in columns:
                ratios.append((name + sync, top + sync, bottom + sync))
    header += [name for name, _, _ in ratios]
    devices = sorted({row["device"] for row in rows})
    steps = sorted({row["steps"] for row in rows})
    print(f"device {', '.join(devices)}; timed steps {', '.join(map(str, steps))}; "
          "images/s (fp32 unless named)"
          + (f"; median of {rounds} rounds, ratio of medians (range of per-round ratios)"
             if rounds > 1 else ""))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (design, batch), values in sorted(table.items()):
        cells = [design, str(batch)]
        cells += [f"{values[c]:,.1f}" if c in values else "-" for c in columns]
        for _, top, bottom in ratios:
            if top in values and bottom in values and values[bottom] > 0:
                cell = f"{values[top] / values[bottom]:.2f}x"
                if rounds > 1:
                    # The range of the ratios of runs made in the same round.
                    tops = dict(samples[(design, batch)][top])
                    bottoms = dict(samples[(design, batch)][bottom])
                    per_round = [tops[r] / bottoms[r] for r in tops if bottoms.get(r, 0) > 0]
                    cell += f" ({min(per_round):.2f}-{max(per_round):.2f})"
                cells.append(cell)
            else:
                cells.append("-")
        print("| " + " | ".join(cells) + " |")
    for design, counts in sorted(params.items()):
        if len(set(counts.values())) > 1:
            print(f"warning: {design}: parameter counts differ: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
