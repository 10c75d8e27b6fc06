"""Regenerate the small real-data sample bundled in src/slimtune/data/samples (seeded, so it is reproducible).

Rows are drawn at random from the shared data and copied byte for byte, in their original order, so that the
sample is in each data set's own format and the recipes read it exactly as they read the full data.

    .venv/bin/python scripts/make_sample.py [--shared ../shared/data] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from slimtune.data.recipes import SAMPLE_DIR, shared_data_dir

#: Rows per file: enough for the demo's pool and the held-out rows its evaluation needs, under 1 MB in all.
ROWS = {
    "gsm8k/train.jsonl": 200,
    "gsm8k/test.jsonl": 60,
    "p3/p3_sample.jsonl": 250,
    "taskmaster4/dialogs.jsonl": 150,
}
#: Tatoeba's two files per language are line-aligned, so the same lines are drawn from both.
TATOEBA = {"fra": 150}


def draw(lines: list[bytes], count: int, rng: random.Random) -> list[bytes]:
    return [lines[i] for i in sorted(rng.sample(range(len(lines)), min(count, len(lines))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=None, help="the shared data folder (default: found)")
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shared = args.shared or shared_data_dir()
    if shared is None:
        raise SystemExit("the shared data folder was not found; pass --shared")
    rng = random.Random(args.seed)
    for relative, count in ROWS.items():
        rows = draw((shared / relative).read_bytes().splitlines(keepends=True), count, rng)
        target = args.out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"".join(rows))
        print(f"{target}: {len(rows)} rows")
    for code, count in TATOEBA.items():
        names = [f"tatoeba/tatoeba.{code}-eng.{code}", f"tatoeba/tatoeba.{code}-eng.eng"]
        files = [(shared / name).read_bytes().split(b"\n")[:-1] for name in names]
        chosen = sorted(rng.sample(range(len(files[0])), count))
        for name, lines in zip(names, files):
            target = args.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"".join(lines[i] + b"\n" for i in chosen))
            print(f"{target}: {count} lines")


if __name__ == "__main__":
    main()
