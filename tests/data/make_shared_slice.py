"""Write tests/data/shared_slice/: the first records of each ../shared/data file the tests read, in
the files' own formats, so that the loader tests and the experiments' quick runs also run where
../shared/data is absent (a clean clone on another machine). Run from the project root:

    python tests/data/make_shared_slice.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
PER_RELATION = 25  # FewRel instances kept per relation
RECORDS = 20  # known_1000 and CounterFact records kept
LRE = ("landmark_on_continent.json", "landmark_in_country.json")  # LRE factual relations kept, RECORDS samples each


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=HERE.parents[2] / "shared" / "data")
    args = ap.parse_args()
    src, out = args.shared, HERE / "shared_slice"
    (out / "fewrel").mkdir(parents=True, exist_ok=True)
    (out / "rome").mkdir(parents=True, exist_ok=True)

    val = json.loads((src / "fewrel" / "val_wiki.json").read_text())
    (out / "fewrel" / "val_wiki.json").write_text(json.dumps({pid: rows[:PER_RELATION] for pid, rows in val.items()}))
    names = json.loads((src / "fewrel" / "pid2name.json").read_text())
    (out / "fewrel" / "pid2name.json").write_text(json.dumps({pid: names[pid] for pid in val}, indent=1))
    shutil.copyfile(src / "fewrel" / "LICENSE", out / "fewrel" / "LICENSE")

    for name in ("known_1000.json", "counterfact-train.json"):
        rows = json.loads((src / "rome" / name).read_text())
        (out / "rome" / name).write_text(json.dumps(rows[:RECORDS], indent=1))
    shutil.copyfile(src / "rome" / "LICENSE.known_1000", out / "rome" / "LICENSE.known_1000")

    lre = out / "lre_relations" / "data" / "factual"
    lre.mkdir(parents=True, exist_ok=True)
    for name in LRE:
        data = json.loads((src / "lre_relations" / "data" / "factual" / name).read_text())
        (lre / name).write_text(json.dumps({**data, "samples": data["samples"][:RECORDS]}, indent=1))
    shutil.copyfile(src / "lre_relations" / "LICENSE", out / "lre_relations" / "LICENSE")


if __name__ == "__main__":
    main()
