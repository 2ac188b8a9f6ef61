"""Chat templates render byte for byte as transformers' ``apply_chat_template`` renders them."""

import json

import pytest

from mlx_gpt import chat
from mlx_gpt.errors import UserError
from mlx_gpt.tokenizer import ByteTokenizer

# templates of the shapes models ship: ChatML (ours), Llama-2's [INST] with a system prompt folded
# into the first turn and raise_exception, Zephyr's with eos_token, one using namespace, loop and
# tojson, and one marking assistant text with {% generation %}
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}"
          "{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
FANCY = ("{%- set ns = namespace(n=0) -%}\n{%- for m in messages -%}\n  {%- if m.role == 'assistant' -%}"
         "{%- set ns.n = ns.n + 1 -%}{%- endif -%}\n  {{ loop.index }}:{{ m | tojson }}\n"
         "{%- if loop.index is divisibleby 2 %} | {% continue %}{% endif %}\n  ;\n{%- endfor -%}\n"
         "[{{ ns.n }} replies]{% if add_generation_prompt %}>{% endif %}")
GENERATION = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}\n"
              "{% endgeneration %}{% else %}{{ m.role[0] | upper }}: {{ m.content }}\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}A:{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief.\n  Always."}, {"role": "user", "content": "Hi <b>&'\"</b> ünï 😀"},
     {"role": "assistant", "content": "  Hello!  "}, {"role": "user", "content": "And again?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d\n"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from mlx_gpt.formats.hf_tokenizer import to_tokenizers

    return PreTrainedTokenizerFast(tokenizer_object=to_tokenizers(ByteTokenizer()), eos_token="<0x00>",
                                   bos_token="<0x01>")


@pytest.mark.parametrize("template", [chat.DEFAULT_TEMPLATE, LLAMA2, ZEPHYR, FANCY, GENERATION],
                         ids=["chatml", "llama2", "zephyr", "fancy", "generation"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_is_byte_identical_to_transformers(hf_tokenizer, template, add_generation_prompt):
    tokens = {"bos_token": "<0x01>", "eos_token": "<0x00>"}
    for messages in CONVERSATIONS:
        ours = chat.render(template, messages, add_generation_prompt, **tokens)
        theirs = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        assert ours == theirs


def test_default_template_layout_and_end_of_turn():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert chat.render(chat.DEFAULT_TEMPLATE, messages) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = chat.render(chat.DEFAULT_TEMPLATE, messages[:1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert chat.end_of_turn(chat.DEFAULT_TEMPLATE) == "<|im_end|>"
    assert chat.end_of_turn(ZEPHYR, eos_token="</s>") == "</s>"
    assert chat.end_of_turn("{% for m in messages %}{{ m.content }}{% endfor %}") == ""


def test_template_of_and_special_tokens():
    tok = ByteTokenizer()
    assert chat.template_of(tok) == chat.DEFAULT_TEMPLATE and chat.special_tokens(tok) == {}


def test_bad_templates_and_roles_are_user_errors():
    with pytest.raises(UserError, match="does not parse"):
        chat.render("{% for %}", [])
    with pytest.raises(UserError, match="must alternate"):
        chat.render(LLAMA2, [{"role": "assistant", "content": "x"}], bos_token="", eos_token="")
    with pytest.raises(UserError, match="fails to render"):  # the sandbox refuses reaching into Python
        chat.render("{{ messages.__class__.__mro__ }}", [])
    assert chat.check_roles([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) is None
    assert "out of order" in chat.check_roles([{"role": "assistant", "content": "b"}])
    assert "out of order" in chat.check_roles([{"role": "system", "content": "s"}, {"role": "system", "content": "s"}])
    assert "role" in chat.check_roles([{"role": "tool", "content": "b"}])
    assert "string" in chat.check_roles([{"role": "user"}])
    assert "non-empty" in chat.check_roles([])


def test_template_is_imported_kept_and_exported(tmp_path, data_files):
    """convert imports tokenizer_config.json's template, the checkpoint keeps it, and the Hugging
    Face export renders it in transformers as we do."""
    import shutil

    import transformers

    from mlx_gpt import checkpoint, convert
    from mlx_gpt.tokenizer import load_tokenizer

    src = tmp_path / "hf"
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(src)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(data_files / "gpt2" / name, src / name)
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": ZEPHYR}))
    convert.import_checkpoint(src, tmp_path / "ckpt", progress=False)
    tok = load_tokenizer(checkpoint.resolve(tmp_path / "ckpt"))
    assert chat.template_of(tok) == ZEPHYR and chat.special_tokens(tok)["eos_token"] == "<|endoftext|>"
    convert.export_checkpoint(tmp_path / "ckpt", tmp_path / "out", to="hf", progress=False)
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for messages in CONVERSATIONS:
        assert back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            chat.render(chat.template_of(tok), messages, True, **chat.special_tokens(tok))
    convert.export_checkpoint(tmp_path / "ckpt", tmp_path / "mlx-lm", to="mlx-lm", progress=False)
    assert json.loads((tmp_path / "mlx-lm" / "tokenizer_config.json").read_text())["chat_template"] == ZEPHYR


def test_encode_reads_end_of_text_as_its_token_as_transformers_does(data_files, tmp_path):
    import shutil

    import transformers

    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer

    ours = GPT2Tokenizer.from_directory(data_files / "gpt2")
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):  # Hugging Face's names
        shutil.copy(data_files / "gpt2" / src, tmp_path / dst)
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for messages in CONVERSATIONS:
        text = chat.render(ZEPHYR, messages, True, **chat.special_tokens(ours))
        assert text.count("<|endoftext|>") == len(messages)
        assert chat.encode(ours, text) == theirs(text)["input_ids"]
    assert chat.encode(ByteTokenizer(), "a<|endoftext|>") == list(b"a<|endoftext|>")  # no such token: text
