"""Print the Markdown accuracy table of a model's ``metrics.json`` (for model cards and docs/benchmarks.md).

    .venv/bin/python benchmarks/metrics_table.py models/cascade-hippocampus
    .venv/bin/python benchmarks/metrics_table.py runs/benchmarks/pin-test/eval/metrics.json

The table is the one ``lmk3d evaluate`` prints: per landmark and overall, n, missing, MRE, SD, median
and SDR at the radii the metrics were computed with (errors in mm; SDR counts missing landmarks as
failures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="a metrics.json file, or a model folder holding one")
    args = parser.parse_args()
    from lmk3d.metrics import Summary, summaries_markdown

    path = Path(args.metrics)
    if path.is_dir():
        path = path / "metrics.json"
    data = json.loads(path.read_text())
    per = {name: Summary(**s) for name, s in data["per_landmark"].items()}
    subset = data.get("subset", "?")
    print(f"{path}: {subset} split, {data.get('n_cases', '?')} cases, split seed {data.get('split_seed', '?')}\n")
    print(summaries_markdown(per, Summary(**data["overall"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
