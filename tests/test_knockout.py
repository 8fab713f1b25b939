"""Attention knockout against a naive one-run-per-cell oracle, and its invariants."""

import pytest
import torch
from conftest import all_hooks, checksum, random_model, same_weights

import relation_lens as rl

PROMPT, SUBJECT = "The Space Needle is located in the city of", "The Space Needle"


def naive_knockout(model, tokens, keys, layers, target, head=None):
    """P(target) with the last position's attention to ``keys`` blocked in ``layers``: one run, its own hooks."""
    def block(scores, hook):
        scores = scores.clone()
        heads = slice(None) if head is None else head
        scores[0, heads, -1, keys] = float("-inf")
        return scores

    with torch.no_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=[(f"blocks.{j}.attn.hook_attn_scores", block)
                                                               for j in layers])
    return logits[0, -1].softmax(-1)[target].item()


def rome_window(layer, window, n_layers):
    """The layers ROME restores around ``layer`` (experiments/causal_trace.py: ``max(0, layer - window // 2)``
    to ``min(n_layers, layer - (-window // 2))``), written out here as offsets so the oracle does not
    call the library's helper: ``-(window // 2) <= j - layer <= (window - 1) // 2``."""
    return [j for j in range(n_layers) if -(window // 2) <= j - layer <= (window - 1) // 2]


def test_rome_window_offsets():
    # an odd window is centred, an even one has one more layer below than above (ROME's rule)
    assert rome_window(5, 3, 12) == [4, 5, 6] and rome_window(5, 4, 12) == [3, 4, 5, 6]
    assert rome_window(0, 10, 48) == [0, 1, 2, 3, 4] and rome_window(20, 10, 48) == list(range(15, 25))


@pytest.mark.parametrize("per_head", [False, True])
def test_knockout_matches_naive_oracle(tiny_model, per_head):
    saved = checksum(tiny_model)
    res = rl.knockout(tiny_model, PROMPT, subject=SUBJECT, window=3, per_head=per_head, batch_size=7)
    tokens = tiny_model.to_tokens(PROMPT)[0]
    L, H, T = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, len(tokens)
    # the sources, derived from the string tokens: BOS, the subject's tokens, the relation, the last token
    strs = tiny_model.to_str_tokens(PROMPT)
    end = next(k for k in range(2, T) if "".join(strs[1:k]) == "The Space Needle")
    assert res.positions == {"subject": list(range(1, end)), "relation": list(range(end, T - 1)), "last": [T - 1],
                             "other": [0]}
    with torch.no_grad():
        clean = tiny_model(tokens[None])[0, -1].softmax(-1)[res.target_token].item()
    assert res.clean_prob == pytest.approx(clean, abs=1e-6)
    spread = 0.0
    for source, keys in res.positions.items():
        for layer in range(L):
            for head in (range(H) if per_head else [None]):
                want = naive_knockout(tiny_model, tokens, keys, rome_window(layer, 3, L), res.target_token,
                                      head) if keys else clean
                at = (layer, head) if per_head else (layer,)
                assert res.prob[source][at].item() == pytest.approx(want, abs=1e-5), (source, layer, head)
                # the relative change is against the clean probability: (P_blocked - P_clean) / P_clean
                assert res.change[source][at].item() == pytest.approx((want - clean) / clean, abs=1e-5 / clean)
                spread = max(spread, abs(want - clean))
    assert spread > 1000 * 1e-5  # the knockouts move P far more than the tolerance
    assert same_weights(tiny_model, saved) and all_hooks(tiny_model) == 0


def test_blocking_nothing_changes_nothing(tiny_model):
    # the subject starts the prompt after BOS: with BOS off, the "other" source is empty
    res = rl.knockout(tiny_model, PROMPT, subject=SUBJECT, window=2, prepend_bos=False)
    assert res.positions["other"] == []
    assert torch.all(res.change["other"] == 0)


def test_blocking_everything_leaves_the_last_tokens_own_path(tokenizer):
    """Blocking every other position at every layer: the last token then only attends to itself, so
    its path is the model run on that token alone at its position (computed without hooks)."""
    model = random_model(tokenizer, "knockout-gpt2", n_layers=3, normalization_type="LN", act_fn="gelu_new")
    tokens = model.to_tokens(PROMPT)[0]
    T = len(tokens)
    res = rl.knockout(model, PROMPT, subject=SUBJECT, window=2 * model.cfg.n_layers, sources=("subject",))
    everything = list(range(T - 1))
    blocked = naive_knockout(model, tokens, everything, range(model.cfg.n_layers), res.target_token)
    with torch.no_grad():  # the last token alone, with its own positional embedding, through every block
        resid = model.embed(tokens[None, -1:]) + model.W_pos[T - 1]
        alone = model(resid, start_at_layer=0)[0, -1].softmax(-1)[res.target_token].item()
    assert blocked == pytest.approx(alone, abs=1e-5)
    assert abs(blocked - res.clean_prob) > 1e-3  # the other positions did matter


def test_result_round_trip_plot_and_bad_input(tiny_model, tmp_path):
    res = rl.knockout(tiny_model, PROMPT, subject=SUBJECT, window=2, sources=("subject", "relation"))
    back = rl.KnockoutResult.from_json(res.to_json(tmp_path / "k.json"))
    assert back == res and "KnockoutResult(" in repr(res)
    res.plot(tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 1000 and "<img" in res.to_html()
    with pytest.raises(rl.ConfigError, match="sources"):
        rl.knockout(tiny_model, PROMPT, subject=SUBJECT, sources=("verbs",))
    with pytest.raises(rl.ConfigError, match="window must be a positive int"):
        rl.knockout(tiny_model, PROMPT, subject=SUBJECT, window=0)


def test_knockout_dataset_means_and_intervals_by_hand(tiny_model):
    """The dataset means and 95% half-widths are those of the per-prompt changes (computed here by
    hand: mean, 1.96 x sample sd / sqrt(n)); a prompt without relation words is left out of that
    source only; the JSON round trip keeps everything."""
    facts = [("The Space Needle is located in the city of", "The Space Needle"),
             ("Paris is the capital of", "Paris"),
             ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),  # no relation token before " is"
             ("I visited the Louvre", "the Louvre")]  # the subject ends the prompt: no relation token
    res = rl.knockout_dataset(tiny_model, facts, window=2, exclude_incorrect=False)
    assert len(res.results) == 4 and all(res.used)
    for source in res.sources:
        have = torch.stack([r.change[source] for r in res.results if r.positions[source]])
        assert res.count[source] == have.shape[0]
        mean = have.double().mean(0)
        half = 1.96 * have.double().std(0, unbiased=True) / have.shape[0] ** 0.5
        assert torch.allclose(res.mean[source].double(), mean, atol=1e-6)
        assert torch.allclose(res.ci95[source].double(), half, atol=1e-6)
    assert res.count["relation"] == 2 and res.count["subject"] == 4
    assert rl.DatasetKnockoutResult.from_dict(res.to_dict()) == res
    correct_only = rl.knockout_dataset(tiny_model, facts, window=2)
    assert correct_only.used == tuple(r.clean_top_token == r.target_token for r in res.results)
