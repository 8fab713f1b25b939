"""Write relation_lens/data/world/known_1000_subjects.json: the subject list of ROME's known_1000
(MIT, ROME-known_1000-LICENSE), which ROME's causal tracing uses to set its noise level
(``noise="rome"`` on models other than the default one). Reads ../shared/data/rome/known_1000.json."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
rows = json.loads((ROOT.parent / "shared" / "data" / "rome" / "known_1000.json").read_text())
subjects = [r["subject"] for r in rows]  # in file order, duplicates kept: ROME pools every record's subject
out = ROOT / "relation_lens" / "data" / "world" / "known_1000_subjects.json"
out.write_text(json.dumps({"source": "ROME known_1000.json (Meng et al. 2022), MIT licence",
                           "subjects": subjects}, ensure_ascii=False, indent=0))
print(f"wrote {len(subjects)} subjects to {out}")
