"""An OpenAI request's prompt -> the token ids an engine prefills: one function for all.

The router hashes these ids to find where a prefix lives, and the engine hashes them
to store it, so both call ``prompt_tokens``. It follows what Hugging Face tokenizers
and vLLM do, so a router in front of vLLM agrees with vLLM block for block:

* ``completions``: ``prompt`` is a string (tokenized with the tokenizer's own special
  tokens, e.g. Llama's BOS), a list of token ids (taken as they are), or a
  one-element list of either;
* ``chat``: ``messages`` rendered with the model's chat template (which writes the
  special tokens itself), then tokenized without adding any.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvmarina.chat import ChatError, render_chat
from kvmarina.tokenizer import Tokenizer


class PromptError(ValueError):
    """A prompt that cannot be tokenized; ``param`` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def prompt_tokens(body: Mapping[str, Any], kind: str, tok: Tokenizer) -> list[int]:
    """Token ids of a ``completions`` or ``chat`` request body."""
    if kind == "chat":
        if "messages" not in body:
            raise PromptError("missing required field 'messages'", "messages")
        try:
            text = render_chat(
                body["messages"], template=tok.chat_template, special_tokens=tok.special_tokens
            )
        except ChatError as exc:
            raise PromptError(str(exc), "messages") from None
        return tok.encode(text)
    if "prompt" not in body:
        raise PromptError("missing required field 'prompt'", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tok.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok.vocab_size for t in prompt
    ):
        return list(prompt)
    raise PromptError(
        "prompt must be a string, a list of token ids (each below the vocabulary size "
        f"{tok.vocab_size}), or a one-element list of either",
        "prompt",
    )
