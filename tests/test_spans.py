import pytest
import torch

from relation_lens import PromptError, SpanError, find_spans
from relation_lens.spans import char_span_to_tokens


def test_subject_and_relation_spans(tiny_model):
    s = find_spans(tiny_model, "The Space Needle is located in the city of", "The Space Needle")
    toks = s.str_tokens
    assert toks[0] == "<|endoftext|>"
    assert "".join(toks[slice(*s.subject_span)]).strip() == "The Space Needle"
    assert "".join(toks[slice(*s.relation_span)]) == " is located in the city of"
    assert s.relation_span == (s.subject_span[1], len(toks))


def test_include_last_false_drops_last_token(tiny_model):
    a = find_spans(tiny_model, "Paris is the capital of", "Paris")
    b = find_spans(tiny_model, "Paris is the capital of", "Paris", include_last=False)
    assert b.relation_span == (a.relation_span[0], a.relation_span[1] - 1)


def test_subject_in_the_middle(tiny_model):
    s = find_spans(tiny_model, "The capital of France is", "France")
    assert "".join(s.str_tokens[slice(*s.subject_span)]) == " France"
    assert "".join(s.str_tokens[slice(*s.relation_span)]) == " is"


def test_second_occurrence(tiny_model):
    s0 = find_spans(tiny_model, "Rome and Rome are in", "Rome")
    s1 = find_spans(tiny_model, "Rome and Rome are in", "Rome", occurrence=1)
    assert s1.subject_span[0] > s0.subject_span[0]


def test_partial_token_subject_covers_whole_token(tiny_model):
    s = find_spans(tiny_model, "Germany is in", "Germ")
    assert "Germ" in "".join(s.str_tokens[slice(*s.subject_span)])


def test_char_span_mapping():
    offsets = [(0, 0), (0, 3), (3, 9), (9, 12)]
    assert char_span_to_tokens(offsets, 3, 9) == (2, 3)
    assert char_span_to_tokens(offsets, 2, 10) == (1, 4)
    assert char_span_to_tokens(offsets, 20, 30) == (0, 0)


@pytest.mark.parametrize("prompt,subject,match", [
    ("The capital of France is", "Spain", "does not occur"),
    ("The capital of France is", "", "empty"),
    ("I love France", "France", "relation span is empty"),
])
def test_bad_spans(tiny_model, prompt, subject, match):
    with pytest.raises(SpanError, match=match) as info:
        find_spans(tiny_model, prompt, subject)
    assert prompt in str(info.value) or subject == ""


def test_empty_prompt(tiny_model):
    with pytest.raises(PromptError, match="empty"):
        find_spans(tiny_model, "   ", "x")


@pytest.mark.filterwarnings("ignore::relation_lens.tracing.TargetWarning")
def test_continuation_convention_is_shared(tiny_model):
    """One convention for where a target's space goes, in tracing, editing and evaluation."""
    from relation_lens.spans import continuation_text, object_tokens
    from relation_lens.tracing import resolve_target

    assert continuation_text("The capital of France is", "Paris") == " Paris"
    assert continuation_text("The capital of France is", " Paris ") == " Paris"
    assert continuation_text("The capital of France is ", "Paris") == "Paris"
    assert continuation_text("Prices in $", "\t5") == "\t5"
    logits = torch.zeros(tiny_model.cfg.d_vocab)
    for prompt, target in [("The capital of France is", "Paris"), ("The capital of France is ", "Paris"),
                           ("The capital of France is", " Paris  ")]:
        ids = object_tokens(tiny_model, prompt, target)
        assert resolve_target(tiny_model, prompt, target, logits).token == int(ids[0])
        if not prompt.endswith(" "):  # the same tokens as at the end of the joined text
            full = tiny_model.to_tokens(prompt + " Paris", prepend_bos=False)[0]
            assert full[-len(ids):].tolist() == ids.tolist()
