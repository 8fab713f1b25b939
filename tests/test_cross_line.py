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
