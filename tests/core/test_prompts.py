"""OpenAI prompts -> token ids, as Hugging Face tokenizers and vLLM make them, through a
model folder's tokenizer and chat template (the preset folder kvmarina exports)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmarina.chat import ChatError, render_chat
from kvmarina.presets import CHAT_TEMPLATE, write_preset_folder
from kvmarina.prompts import PromptError, prompt_tokens
from kvmarina.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preset_folder("small", "float32", tmp_path_factory.mktemp("small"))


def test_a_completion_prompt_gets_the_tokenizers_bos_and_token_ids_pass(folder: Path) -> None:
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer) and tok.bos_id == 256 and tok.eos_id == 257
    text = "héllo, 日本"
    assert prompt_tokens({"prompt": text}, "completions", tok) == [256, *text.encode()]
    assert prompt_tokens({"prompt": [text]}, "completions", tok)[0] == 256
    assert prompt_tokens({"prompt": [[5, 6, 7]]}, "completions", tok) == [5, 6, 7]
    with pytest.raises(PromptError, match="vocabulary size 258") as err:
        prompt_tokens({"prompt": [1, 300]}, "completions", tok)
    assert err.value.param == "prompt"
    with pytest.raises(PromptError, match="missing required field 'prompt'"):
        prompt_tokens({}, "completions", tok)
    # byte tokens (the reference engine's presets) add no BOS, as before
    assert prompt_tokens({"prompt": "ab"}, "completions", ByteTokenizer()) == [97, 98]


def test_chat_goes_through_the_folders_template_and_adds_no_second_bos(folder: Path) -> None:
    tok = load_tokenizer(folder)
    assert tok.chat_template == CHAT_TEMPLATE and tok.special_tokens["bos_token"] == "<s>"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = prompt_tokens({"messages": messages}, "chat", tok)
    text = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert ids == [256, *text.encode()]
    # without a template: kvmarina's own format, the same text without BOS
    assert render_chat(messages) == text
    with pytest.raises(PromptError, match="messages"):
        prompt_tokens({"messages": []}, "chat", tok)


def test_hugging_face_template_semantics() -> None:
    """trim_blocks/lstrip_blocks, loop controls, tojson without HTML escaping,
    raise_exception, and text parts joined by newlines (vLLM's string format)."""
    template = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "[{{ m['role'] }}]{{ m['content'] | tojson }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}{% endif %}"
    )
    parts = [{"type": "text", "text": "a<b>"}, {"type": "text", "text": "ü"}]
    msgs = [{"role": "user", "content": parts}, {"role": "assistant", "content": "x"}]
    out = render_chat(msgs + msgs, template=template, special_tokens={"bos_token": "<s>"})
    assert out == '[user]"a<b>\\nü"\n[assistant]"x"\n<s>'
    with pytest.raises(ChatError, match="no tools"):
        render_chat([{"role": "tool", "content": "x"}], template=template)
    with pytest.raises(ChatError, match="only text parts"):
        render_chat([{"role": "user", "content": [{"type": "image_url"}]}], template=template)
