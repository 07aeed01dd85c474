"""raymoe's Tokenizer against transformers' AutoTokenizer (the reference) on the same directory."""

import json
import pickle
import random
import shutil
import unicodedata

import jinja2
import pytest

from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.actors.models.builtin import ensure_builtin

TEXTS = [
    "",
    "Hello world!",
    "The lighthouse keeper's log, 2024.\n\nShe didn't know; they'll see.",
    "  leading spaces,\ttabs\r\nand trailing   ",
    "日本語のテキストと中文字符",
    "emoji 🚀🔥👩‍👩‍👧 and café naïve Å",  # composed and decomposed forms (NFC)
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos<|im_end|>",
    "numbers 1234567890 and symbols {}[]()<>|\\/ @#$%^&*",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful lighthouse keeper."},
        {"role": "user", "content": "Will the weather hold? 🌊"},
        {"role": "assistant", "content": "Until evening, yes."},
        {"role": "user", "content": "谢谢！ And tomorrow?\nTwo lines."},
    ],
    [{"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return ensure_builtin("tiny-qwen3-moe", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf, text, add_special_tokens):
    assert tok.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok, hf, text, skip):
    ids = hf.encode(text)
    assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_round_trips_unicode(tok):
    for text in TEXTS:
        if "<|" not in text:
            assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_decode_random_ids_matches_transformers(tok, hf):
    """Arbitrary id sequences, incl. byte tokens that split or break UTF-8 characters."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_special_tokens_and_sizes(tok, hf, ckpt):
    assert tok.vocab_size == len(hf)
    assert tok.bos_token == hf.bos_token and tok.eos_token == hf.eos_token == "<|im_end|>"
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert tok.eos_token_ids == frozenset(gen["eos_token_id"])
    assert hf.convert_tokens_to_ids("<|im_end|>") in tok.eos_token_ids


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, chat, gen_prompt):
    ours = tok.apply_chat_template(chat, add_generation_prompt=gen_prompt)
    ref = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen_prompt)
    assert ours == ref
    assert ours.startswith("<|im_start|>") and ours.endswith("assistant\n") == gen_prompt


# A template exercising what real ones use: bos/eos variables, tojson, namespace,
# loop controls, raise_exception, trim/lstrip blocks, and {% generation %} markers.
RICH_TEMPLATE = """\
{{ bos_token }}
{%- set ns = namespace(n=0) %}
{%- for m in messages %}
    {%- if m['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unsupported role ' + m['role']) }}
    {%- endif %}
    {%- if m['content'] == 'skip me' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    <{{ m['role'] }} n={{ ns.n }}>
    {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}
    {% else %}{{ m | tojson }}
    {% endif %}
{%- endfor %}
{%- if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{%- if add_generation_prompt %}<assistant>{% else %}{{ eos_token }}{% endif %}
"""


@pytest.fixture
def rich_dir(ckpt, tmp_path):
    d = tmp_path / "rich"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = "<|endoftext|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    # chat_template.jinja takes priority over tokenizer_config.json's template
    (d / "chat_template.jinja").write_text(RICH_TEMPLATE)
    return d


def test_chat_template_jinja_file_and_helpers_match_transformers(rich_dir):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer.from_dir(rich_dir), AutoTokenizer.from_pretrained(rich_dir)
    chat = CHATS[1] + [{"role": "user", "content": "skip me"}, {"role": "user", "content": '<"quoted" & ünïcode>'}]
    for gen_prompt in (True, False):
        got = ours.apply_chat_template(chat, add_generation_prompt=gen_prompt)
        assert got == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen_prompt)
        assert got.startswith("<|endoftext|>") and "skip me" not in got and "ünïcode" in got
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    got = ours.apply_chat_template(chat, tools=tools)
    assert got == ref.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"name": "f"' in got


def test_raise_exception_in_template(rich_dir):
    ours = Tokenizer.from_dir(rich_dir)
    with pytest.raises(jinja2.TemplateError, match="unsupported role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_is_sandboxed(rich_dir):
    (rich_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.from_dir(rich_dir).apply_chat_template(CHATS[0])


def test_no_chat_template_is_a_clear_error(ckpt, tmp_path):
    d = tmp_path / "plain"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    assert tok.encode("hi") == Tokenizer.from_dir(ckpt).encode("hi")
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])


def test_eos_ids_fall_back_to_config_json(ckpt, tmp_path):
    d = tmp_path / "noeos"
    shutil.copytree(ckpt, d)
    (d / "generation_config.json").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|endoftext|>", "special": True}  # AddedToken form
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    config_eos = json.loads((d / "config.json").read_text())["eos_token_id"]
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_ids == {config_eos, tok.token_to_id("<|endoftext|>")}


def test_pickles_after_use(tok):
    tok.apply_chat_template(CHATS[0])  # compiles and caches the template
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(TEXTS[5]) == tok.encode(TEXTS[5])
    assert copy.apply_chat_template(CHATS[1]) == tok.apply_chat_template(CHATS[1])
    assert copy.eos_token_ids == tok.eos_token_ids


def test_missing_tokenizer_json_names_dir_and_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json") as exc:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_token_bytes_match_xgrammar_decoded_vocabulary(tok, hf):
    """Each token's own bytes, against xgrammar's reading of the same vocabulary (byte-level
    BPE: a token may hold part of a character, whose decode() is U+FFFD)."""
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(hf, stop_token_ids=sorted(tok.eos_token_ids))
    specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    ids = [i for i in range(tok.vocab_size) if i not in specials]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # partial characters are there to test
    assert [tok.token_bytes(i) for i in ids] == [info.decoded_vocab[i] for i in ids]
    for i in specials:  # their text
        assert tok.token_bytes(i) == tok.decode([i], skip_special_tokens=False).encode()
    text = "日本語 🚀 café"
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text, add_special_tokens=False)) == text.encode()


def test_token_bytes_of_byte_fallback_tokens(tmp_path):
    """A SentencePiece-style vocabulary (Llama, Mistral): characters it lacks are <0xNN> byte
    tokens, decoded alone to U+FFFD; their bytes against xgrammar's reading."""
    import transformers
    import xgrammar
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "▁a", "ab", "é"]:
        vocab[piece] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[("▁", "a"), ("a", "b")], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = Tokenizer(backend, special_tokens={}, eos_token_ids=[2], chat_template=None)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    info = xgrammar.TokenizerInfo.from_huggingface(hf, stop_token_ids=[2])
    assert info.vocab_type == xgrammar.VocabType.BYTE_FALLBACK
    for i in range(3, len(vocab)):
        assert tok.token_bytes(i) == info.decoded_vocab[i], backend.id_to_token(i)
    ids = tok.encode("ab 日é", add_special_tokens=False)
    assert any(backend.id_to_token(i).startswith("<0x") for i in ids)
    assert b"".join(tok.token_bytes(i) for i in ids) == " ab 日é".encode()
