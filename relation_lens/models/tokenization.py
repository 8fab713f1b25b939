"""The tokenisation a loaded model was trained with: the Hugging Face tokenizer's own BOS rule.

TransformerLens prepends its tokenizer's ``bos_token`` by default. For tokenizers that add no BOS
(GPT-2's, SmolLM2's) that is not the text the model was trained on, and for chat-tuned tokenizers
whose ``bos_token`` is a chat token (SmolLM2's ``<|im_start|>``) it is a turn marker: P(" Paris")
after "The Eiffel Tower is located in the city of" falls from 0.70 to 0.30 on SmolLM2-135M. So a
loaded model follows its tokenizer: ``default_prepend_bos`` is whether the Hugging Face tokenizer
adds a BOS itself, and where a BOS is asked for explicitly (``prepend_bos=True``) on a tokenizer whose
BOS is a chat-template token, the document separator (``<|endoftext|>``) is used instead.
"""

from __future__ import annotations

from typing import Any

from relation_lens.model_interface import Model

DOCUMENT_SEPARATORS = ("<|endoftext|>", "</s>", "<|end_of_text|>")


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the Hugging Face tokenizer puts its BOS token in front of a text by itself."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def is_chat_token(tokenizer, token: str | None) -> bool:
    """Whether ``token`` is one of the tokenizer's chat-template turn markers."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(token, str) and bool(token) and isinstance(template, str) and token in template


def apply_tokenizer_rule(model: Model, hf_tokenizer) -> dict[str, str]:
    """Set ``model``'s BOS default and BOS token from ``hf_tokenizer`` (the tokenizer as the model's
    folder or file gives it, before TransformerLens wraps it); returns where each came from."""
    adds = tokenizer_adds_bos(hf_tokenizer)
    model.cfg.default_prepend_bos = adds
    sources = {"prepend_bos": f"{adds}: the Hugging Face tokenizer's own rule (it "
                              f"{'adds' if adds else 'adds no'} BOS token to a text)"}
    tok: Any = model.tokenizer
    bos = tok.bos_token
    if not adds and is_chat_token(hf_tokenizer, bos):
        vocab = tok.get_vocab()
        separator = next((s for s in DOCUMENT_SEPARATORS if s in vocab and s != bos), None)
        if separator is not None:
            tok.bos_token = separator
            if getattr(tok, "add_bos_token", False):  # TransformerLens' copy adds one: let it add the separator
                tok.add_bos_token = True
            sources["bos_token"] = (f"{separator!r}, the document separator, for an explicit prepend_bos=True "
                                    f"(the tokenizer's bos_token {bos!r} is a chat-template turn marker)")
        model.cfg.tokenizer_prepends_bos = len(tok.encode("")) > 0
    if "bos_token" not in sources:
        sources["bos_token"] = f"{tok.bos_token!r}, the tokenizer's bos_token, for prepend_bos=True"
    return sources
