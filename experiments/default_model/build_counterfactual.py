"""Write the shipped counterfactual relation dataset for the default model (seeded).

    python experiments/default_model/build_counterfactual.py [--n 1030] [--seed 0]
"""

from __future__ import annotations

import argparse

import relation_lens as rl
from relation_lens.data.counterfact import build_counterfactual, counterfactual_path, save_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1030)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    records = build_counterfactual(rl.load_model(), n=args.n, seed=args.seed)
    save_records(records, counterfactual_path())
    print(f"wrote {len(records)} records to {counterfactual_path()}")


if __name__ == "__main__":
    main()
