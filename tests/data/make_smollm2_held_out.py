"""Write tests/data/smollm2_held_out.json: the first 5 CounterFact records of the held-out split of
experiments/results/smollm2-135m/splits.json (records SmolLM2-135M knows that neither tune nor the
evaluation uses), in CounterFact's own format, so the real-model tier runs where ../shared/data is
absent (a clean clone on another machine). Run from the project root:

    python tests/data/make_smollm2_held_out.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=HERE.parents[2] / "shared" / "data")
    args = ap.parse_args()
    splits = json.loads((HERE.parent.parent / "experiments" / "results" / "smollm2-135m" / "splits.json").read_text())
    want = splits["held_out"][:N]
    rows = json.loads((args.shared / "rome" / "counterfact-train.json").read_text())
    by_id = {r["case_id"]: r for r in rows}
    out = HERE / "smollm2_held_out.json"
    out.write_text(json.dumps([by_id[i] for i in want], indent=1))
    print(f"wrote {len(want)} records to {out}")


if __name__ == "__main__":
    main()
