"""Tokenizer: chat prompts against transformers' apply_chat_template, Llama 4's header format, streaming text."""

from __future__ import annotations

import json
import shutil

import pytest

from llama4_export.runtime import Tokenizer
from llama4_export.runtime.tokenizer import StreamDecoder, llama4_chat_format

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a river?"},
    {"role": "assistant", "content": "Water that flows."},
    {"role": "user", "content": "And a lake?"},
]
# A Llama-4-style template, as tokenizer_config.json files carry them.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{{ m['content'] | trim }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def test_llama4_header_format():
    assert llama4_chat_format(MESSAGES[:2]) == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWhat is a river?<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )


def test_without_a_template_the_header_format_is_used(scoutlike_dir):
    tok = Tokenizer.load(scoutlike_dir)
    assert tok.render_chat(MESSAGES) == llama4_chat_format(MESSAGES)
    ids = tok.chat_prompt(MESSAGES)
    assert ids[0] == tok.token_to_id("<|begin_of_text|>") and ids.count(ids[0]) == 1  # no second BOS


def test_template_in_tokenizer_config_renders_like_transformers(tmp_path, scoutlike_dir):
    from transformers import AutoTokenizer

    shutil.copy(scoutlike_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((scoutlike_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    ours = Tokenizer.load(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(MESSAGES) == expected
    assert expected.startswith("<|begin_of_text|><|header_start|>system")
    assert ours.chat_prompt(MESSAGES) == hf(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", ["naïve café — über straße ☃ 東京", "plain ascii text, with punctuation."])
def test_stream_pieces_join_to_the_full_decode(scoutlike_dir, text):
    tok = Tokenizer.load(scoutlike_dir)
    ids = tok.encode(text, add_special_tokens=False)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_no_tokenizer_file_means_no_tokenizer(tmp_path):
    assert Tokenizer.load(tmp_path) is None


def test_a_long_text_is_tokenized_without_holding_the_gil(tmp_path):
    """A server tokenizes prompts in worker threads: while a long prompt is tokenized, the other threads (the event
    loop, the decode loop) must keep running. tokenizers' encode() holds the GIL throughout; encode_batch() does not."""
    import threading
    import time

    from tokenizers import Tokenizer as HFTokenizer

    from llama4_export.export.tokenizer_files import write_byte_level_tokenizer
    from llama4_export.model import get_preset

    write_byte_level_tokenizer(get_preset("scout-tiny"), tmp_path)
    tok = Tokenizer.load(tmp_path)
    text = "a river flows into the lake, " * 60_000
    ticks, done = [], threading.Event()

    def other_thread():
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.002)

    thread = threading.Thread(target=other_thread)
    thread.start()
    started = time.monotonic()
    ids = tok.encode(text)
    finished = time.monotonic()
    done.set()
    thread.join()
    assert ids == HFTokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids  # the same ids
    during = [t for t in ticks if started < t < finished]
    # the other thread ran all along (it stops only while the ids become a Python list: ~10 % of the time here;
    # while encode() holds the GIL its gap is the whole call)
    gaps = [b - a for a, b in zip([started, *during], [*during, finished])]
    assert max(gaps) < (finished - started) / 3, (finished - started, max(gaps))
