"""Chat templates: the model's own, its family's built-in where the file has none,
`--chat-template` over both; and the end-of-generation tokens a vocabulary holds."""

import pytest
from conftest import TINY, _tiny_tokenizer

from ferrolm.models.chat_templates import BUILTIN
from ferrolm.models.families import FAMILIES
from ferrolm.tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def bare_hf():
    """A tokenizer without a chat template, which knows Gemma's turn tokens."""
    tok = _tiny_tokenizer(TINY["vocab_size"])
    tok.chat_template = None
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def text(tok: Tokenizer) -> str:
    return tok.decode(tok.apply_chat_template(CHAT), skip_special_tokens=False)


def test_a_model_without_a_template_and_no_fallback_refuses_chat(bare_hf):
    tok = Tokenizer(bare_hf)
    with pytest.raises(ValueError, match="no chat template.*--chat-template"):
        tok.apply_chat_template(CHAT)


def test_the_family_builtin_stands_in_for_a_missing_template(bare_hf):
    tok = Tokenizer(bare_hf, family_template="gemma")
    assert "built-in 'gemma'" in tok.chat_template_source
    assert text(tok) == "<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"


def test_the_models_own_template_wins_over_the_family_builtin():
    own = _tiny_tokenizer(TINY["vocab_size"])
    tok = Tokenizer(own, family_template="gemma")
    assert tok.chat_template_source == "the model's"
    assert text(tok) == "<s>system: Be brief.</s><s>user: Hi there</s><s>assistant:"


def test_chat_template_flag_takes_a_name_a_file_or_jinja(bare_hf, tmp_path):
    assert text(Tokenizer(bare_hf, chat_template="chatml")).endswith("<|im_start|>assistant\n")
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
    assert text(Tokenizer(bare_hf, chat_template=str(f), family_template="gemma")) == "[system][user]"
    inline = "{{ messages[-1]['content'] }}!"
    assert text(Tokenizer(bare_hf, chat_template=inline)) == "Hi there!"


def test_a_bad_chat_template_flag_lists_the_builtins(bare_hf):
    with pytest.raises(ValueError, match="gemma, chatml, mistral"):
        Tokenizer(bare_hf, chat_template="no-such-template")


def test_every_family_names_a_builtin_and_every_builtin_renders(bare_hf):
    assert {f.chat_template for f in FAMILIES} <= set(BUILTIN)
    turns = [*CHAT, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    for name in BUILTIN:
        tok = Tokenizer(bare_hf, chat_template=name)
        assert "Bye" in tok.decode(tok.apply_chat_template(turns), skip_special_tokens=False), name


def test_gemma_builtin_rejects_roles_out_of_turn(bare_hf):
    tok = Tokenizer(bare_hf, family_template="gemma")
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_turn_end_tokens_stop_generation_only_when_special(bare_hf):
    tok = Tokenizer(bare_hf)
    end = bare_hf.convert_tokens_to_ids("<end_of_turn>")
    assert tok.eos_token_ids == {bare_hf.eos_token_id, end}
    # A vocabulary without them stops at its EOS only.
    assert Tokenizer(_tiny_tokenizer(TINY["vocab_size"])).eos_token_ids == {bare_hf.eos_token_id}
