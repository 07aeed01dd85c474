"""The built-in checkpoints' tokenizer: a small byte-level BPE (Qwen2's pipeline) trained on
text written for this project, with ChatML's special tokens and chat template."""

from __future__ import annotations

import pathlib

_VOCAB_TARGET = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The Qwen2 pre-tokenizer split pattern (contractions, letter runs, single
# digits, punctuation runs, newlines, whitespace), so that transformers'
# Qwen2Tokenizer, which rebuilds its pipeline from this pattern, matches ours.
_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the tokenizer, written for this project.
_CORPUS = """\
The lighthouse keeper woke before the sun, as she had done for thirty years.
She climbed the spiral stairs, counted the steps, and checked the great lamp.
The sea was calm this morning, and the gulls were already calling over the harbour.
Down in the village, the baker was pulling the first loaves from the oven,
and the smell of warm bread drifted along the narrow streets to the water.

A small boat came around the point at seven o'clock. Two fishermen were aboard,
and they waved to the keeper when they saw her standing on the gallery.
"Good morning!" they shouted. "Will the weather hold today?"
She looked at the clouds in the west and answered that it would hold until evening,
but that they should be home before the wind turned.

Every evening she wrote a few lines in the log: the time the lamp was lit,
the state of the sea, the ships that passed, and anything else worth noting.
Some of the oldest pages were written by her grandfather, in a careful hand,
with notes about storms, wrecks, and rescues that people still talked about.
She liked to read them on quiet nights, when the only sound was the wind.

In the spring, students from the city came to study the birds on the cliffs.
They asked many questions: how many nests were there, when did the chicks hatch,
and which birds stayed through the winter? The keeper did not know every answer,
but she knew where to look, and she showed them the places that were safe to walk.
One of the students, a quiet girl named Ada, returned every year after that.

Years later, when the lamp was replaced by an automatic light, the keeper moved
into a small house in the village. She kept the old log books on a shelf by the window,
and she still woke before the sun. Sometimes she walked to the end of the pier
to watch the new light turn, slow and steady, over the dark water.
The light had changed, she said, but the sea had not, and neither had she.

Numbers matter at sea: 1, 2, 3, 10, 12, 24, 100, 365 and 2024 all appear in the log.
A good log is simple, clear, and honest. It is written for the next reader,
who may need to know what happened, when it happened, and why it mattered.
Questions, answers, and small details: these are the things that help people later.
"""


def train_tokenizer():
    """A byte-level BPE tokenizer (Qwen2-style pipeline) trained on the built-in text.

    Deterministic: the trainer breaks ties between equally frequent pairs by
    the pair itself and sorts the initial byte alphabet, so the same corpus
    always gives the same vocabulary and merges.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def tokenizer_config(ids: dict[str, int]) -> dict:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in sorted(ids.items(), key=lambda kv: kv[1])
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    }


def write_tokenizer(dst: pathlib.Path) -> tuple[dict[str, int], int]:
    """Train the tokenizer and write its tokenizer.json into ``dst`` -> (the special tokens'
    ids, the vocabulary size with them)."""
    tok = train_tokenizer()
    tok.save(str(dst / "tokenizer.json"), pretty=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return ids, tok.get_vocab_size(with_added_tokens=True)
