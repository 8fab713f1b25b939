"""The same numbers on both lines of TransformerLens: seeded random GPT-2, LLaMA (grouped-query
attention), GPT-NeoX and GPT-J folders traced, attribution-patched, patched per head and edited,
against tests/data/cross_line_reference.json (written under TransformerLens 3.9 by
tests/data/make_cross_line_reference.py). Under 3.x this holds the HookedTransformer path to its own
recorded numbers; under 4.x it holds the TransformerBridge path to 3.9's (grids 1e-5, the update
1e-4 relative), which is what "every feature runs on TransformerBridge with the same numbers" means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cross_line import ARCHS, compute, make_folder

import relation_lens as rl
from relation_lens.model_interface import is_bridge
from relation_lens.models.bridge import transformer_lens_major

REFERENCE = json.loads((Path(__file__).parent / "data" / "cross_line_reference.json").read_text())
pytestmark = pytest.mark.transformer_lens_4


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross_line")
    return {arch: make_folder(tokenizer, arch, root) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_same_numbers_as_transformer_lens_3(folders, arch):
    model = rl.load_model(folders[arch])
    assert is_bridge(model) == (transformer_lens_major() >= 4)
    got, want = compute(model), REFERENCE[arch]
    assert got["target_token"] == want["target_token"]
    assert got["clean_prob"] == pytest.approx(want["clean_prob"], abs=1e-5)
    assert got["corrupted_prob"] == pytest.approx(want["corrupted_prob"], abs=1e-5)
    for key in ("grids", "attribution"):
        for kind, grid in want[key].items():
            gap = (torch.tensor(got[key][kind]) - torch.tensor(grid)).abs().max().item()
            assert gap < 1e-5, (key, kind, gap)
    assert torch.allclose(torch.tensor(got["patch"]), torch.tensor(want["patch"]), atol=1e-5)
    assert got["key_count"] == want["key_count"]
    for key in ("left", "right"):
        a, b = torch.tensor(got[key]), torch.tensor(want[key])
        assert ((a - b).norm() / b.norm()).item() < 1e-4, key
    # the grids are not flat: a comparison of constants would prove nothing
    assert torch.tensor(want["grids"]["resid"]).std() > 1e-3


def test_a_loaded_checkpoint_has_one_fingerprint_on_both_lines(default_model):
    """Key statistics and update files are keyed by a fingerprint of the checkpoint, not of the line's
    parameter layout: the embedded model's equals TransformerLens 3.9's on this line (it differed,
    94ddf3a97ac1c2af against dbdc1d8eb8f02d3f, so files made on one line were refused on the other)."""
    from relation_lens.key_statistics import line_fingerprint, model_fingerprint

    want = REFERENCE["default_model_fingerprints"]
    for k in (0, 3, None):
        assert model_fingerprint(default_model, k) == want[str(k)]
    # an edit at layer 2 changes the fingerprints that cover layer 2 and keeps the ones below it
    request = rl.EditRequest("{} is located in the country of", "Paris", "Italy")
    stats = rl.KeyStatistics.compute(default_model, 2, n_texts=50, progress=False, cache=False)
    update = rl.compute_edit(default_model, request, method="relation_rome", layer=2, stats=stats,
                             config=rl.EditConfig(v_steps=3))
    with rl.apply_edit(default_model, update):
        assert model_fingerprint(default_model, 0) == want["0"]
        assert model_fingerprint(default_model, 3) == line_fingerprint(default_model, 3) != want["3"]
        assert model_fingerprint(default_model) != want["None"]
    assert model_fingerprint(default_model, 3) == want["3"]
