"""Tokenizer: chat prompts against transformers' apply_chat_template, Llama 4's header format, streaming text."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from llama4_export.runtime import Tokenizer
from llama4_export.runtime.errors import GenerationError
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


def test_without_a_template_the_header_format_is_used(tmp_path, scoutlike_dir):
    """A vocabulary with Llama 4's chat tokens (the presets' byte-level one, its template left out) takes the header
    format; one without them (l4-scoutlike, a base model's) is refused rather than spelled out in bytes."""
    from llama4_export.export.tokenizer_files import byte_level_tokenizer
    from llama4_export.model.config import get_preset

    byte_level_tokenizer(get_preset("scout-tiny")).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.render_chat(MESSAGES) == llama4_chat_format(MESSAGES)
    ids = tok.chat_prompt(MESSAGES)
    assert ids[0] == tok.token_to_id("<|begin_of_text|>") and ids.count(ids[0]) == 1  # no second BOS
    assert ids.count(tok.token_to_id("<|header_start|>")) == len(MESSAGES) + 1
    with pytest.raises(GenerationError, match=r"^tokenizer_config.json: no chat template, and the vocabulary lacks "
                                              r"Llama 4's chat tokens \(<\|header_start\|>, <\|header_end\|>, <\|eot\|>\)"):
        Tokenizer.load(scoutlike_dir).chat_prompt(MESSAGES)


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


def test_a_template_with_an_added_token_dict_and_strftime_now_renders_like_transformers(tmp_path, scoutlike_dir):
    """bos_token saved as older transformers save it ({"__type": "AddedToken", "content": ...}) was left out of the
    render (no BOS); a template calling transformers' strftime_now was refused as "undefined"."""
    from transformers import AutoTokenizer

    shutil.copy(scoutlike_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((scoutlike_dir / "tokenizer_config.json").read_text())
    bos = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
           "rstrip": False, "single_word": False}
    template = TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}{{ strftime_now('%Y') | length }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bos, "chat_template": template}))
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES, tokenize=False,
                                                                            add_generation_prompt=True)
    assert expected.startswith("<|begin_of_text|>4<|header_start|>system")
    assert Tokenizer.load(tmp_path).render_chat(MESSAGES) == expected


@pytest.mark.parametrize("text", ["naïve café — über straße ☃ 東京", "plain ascii text, with punctuation."])
def test_stream_pieces_join_to_the_full_decode(scoutlike_dir, text):
    tok = Tokenizer.load(scoutlike_dir)
    ids = tok.encode(text, add_special_tokens=False)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.fixture
def byte_level_dir(tmp_path):
    """The presets' byte-level BPE tokenizer (one token per byte plus the special tokens): needs no checkpoint."""
    from llama4_export.export.tokenizer_files import write_byte_level_tokenizer
    from llama4_export.model import get_preset

    write_byte_level_tokenizer(get_preset("scout-tiny"), tmp_path)
    return tmp_path


def test_stream_pieces_of_any_tokens_join_to_tokenizers_decode_at_a_constant_cost_per_token(byte_level_dir):
    """Random ids (bytes that are not UTF-8, special tokens, characters split across tokens) stream to exactly the text
    tokenizers decodes them to; and each push decodes only the tokens since the last piece and that piece's, not the
    whole text so far (which made a long stream quadratic)."""

    reference = HFTokenizer.from_file(str(byte_level_dir / "tokenizer.json"))
    tok = Tokenizer.load(byte_level_dir)
    decoded = []
    decode = tok.decode
    tok.decode = lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw)
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, reference.get_vocab_size(), rng.integers(1, 40)).tolist()
        decoder = StreamDecoder(tok)
        assert "".join([decoder.push(t) for t in ids] + [decoder.flush()]) == reference.decode(ids)
    text = "naïve café — über straße ☃ 東京 🙂 plain ascii, with punctuation. " * 60
    ids = tok.encode(text, add_special_tokens=False)
    decoder, decoded[:] = StreamDecoder(tok), []
    assert "".join(decoder.push(t) for t in ids) == text and len(ids) > 4000
    assert sum(decoded) < 10 * len(ids), (sum(decoded), len(ids))  # linear: ≈ 4 ids a push here, not len(ids) / 2


def test_token_bytes_join_to_the_texts_utf8_merged_tokens_holding_parts_of_characters(tmp_path):
    """A byte-level BPE token's bytes (what logprobs report) must be exactly its share of the text's UTF-8, also for a
    merged token that holds only part of a character; reference: Python's str.encode. The tokenizer is trained here
    on text whose most frequent byte pairs are parts of characters."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    # hiragana share their first two bytes (E3 81 / E3 82): with few merges those pairs merge before any character
    corpus = ["".join(chr(0x3041 + (7 * i + j) % 83) for j in range(12)) + " naïve café" for i in range(200)]
    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.decoder = decoders.ByteLevel()
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|begin_of_text|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    text = "とうきょう 東京 ☃ naïve — 🙂 plain"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(len(p) > 1 and not _is_utf8(p) for p in pieces)  # a merged token holding part of a character
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.token_bytes(bos) == b"<|begin_of_text|>" and tok.is_special(bos) and not tok.is_special(ids[0])


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_no_tokenizer_file_means_no_tokenizer(tmp_path):
    assert Tokenizer.load(tmp_path) is None


def test_a_long_text_is_tokenized_without_holding_the_gil(byte_level_dir):
    """A server tokenizes prompts in worker threads: while a long prompt is tokenized, the other threads (the event
    loop, the decode loop) must keep running. tokenizers' encode() holds the GIL throughout; encode_batch() does not."""
    import threading
    import time


    tok = Tokenizer.load(byte_level_dir)
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
    assert ids == HFTokenizer.from_file(str(byte_level_dir / "tokenizer.json")).encode(text).ids  # the same ids
    during = [t for t in ticks if started < t < finished]
    # the other thread ran all along (it stops only while the ids become a Python list: ~10 % of the time here;
    # while encode() holds the GIL its gap is the whole call)
    gaps = [b - a for a, b in zip([started, *during], [*during, finished])]
    assert max(gaps) < (finished - started) / 3, (finished - started, max(gaps))


def test_streamed_pieces_join_to_the_result_text_when_it_ends_inside_a_character(byte_level_dir):
    """A random model's bytes often end inside a UTF-8 character: whether generation ends by length or by a stop
    token, the last event carries what was held back, so the pieces join to GenerationResult.text (an incomplete
    character as U+FFFD, as tokenizers decodes it)."""
    import torch

    from llama4_export.evaluation.torch_backend import TorchBackend
    from llama4_export.runtime import Generator
    from llama4_export.weights import RandomWeights, materialize

    reference = HFTokenizer.from_file(str(byte_level_dir / "tokenizer.json"))
    model = materialize(RandomWeights("scout-tiny", seed=5, layers=2), torch.float32)  # 2 layers: its bytes are as random
    gen = Generator(TorchBackend(model), Tokenizer.load(byte_level_dir), window=128)
    ended_inside = {"length": 0, "stop": 0}
    for seed in range(2):
        options = dict(max_new_tokens=24, temperature=1.0, seed=seed, stop_tokens=[])
        free = gen.generate([1, 2, 3], **options)
        assert free.text == reference.decode(free.token_ids)
        for k in range(1, 24):  # stop after k tokens: by length, and by a stop token where one first comes at k
            cases = [("length", {**options, "max_new_tokens": k}, free.token_ids[:k])]
            if free.token_ids[k] not in free.token_ids[:k]:
                cases.append(("stop", {**options, "stop_tokens": [free.token_ids[k]]}, free.token_ids[:k + 1]))
            for reason, case, tokens in cases:
                events = list(gen.stream([1, 2, 3], **case))
                text = reference.decode(free.token_ids[:k])  # the result's text: the stop token is not in it
                assert [e.token_id for e in events] == tokens and "".join(e.text for e in events) == text, (seed, k)
                ended_inside[reason] += text.endswith("\ufffd")
    assert min(ended_inside.values()) > 0, ended_inside  # both endings were exercised


def test_a_text_holding_undecodable_bytes_is_one_clear_error(byte_level_dir):
    """Bytes that are not UTF-8 reach Python as lone surrogates (os.fsdecode of argv, a file read with
    errors="surrogateescape"); tokenizers refused them with a TypeError that named neither the text nor the cause."""
    tok = Tokenizer.load(byte_level_dir)
    assert tok.encode("caf\u00e9") == HFTokenizer.from_file(str(byte_level_dir / "tokenizer.json")).encode("caf\u00e9").ids
    with pytest.raises(GenerationError, match=r"^the prompt: not UTF-8 text \(character 3 is an undecodable byte\)"):
        tok.encode("caf" + b"\xe9".decode("utf-8", "surrogateescape"))


def test_the_chat_template_is_compiled_once_per_tokenizer_and_a_broken_one_is_named(tmp_path, scoutlike_dir,
                                                                                     monkeypatch):
    """Every chat request compiled the template again (~16 ms for Llama 4's, where rendering it takes 0.02 ms: the
    server's time to first token paid it per request). Now one compile per Tokenizer, each conversation still as
    transformers renders it; a template that does not compile names its file, on every call."""
    import jinja2
    from transformers import AutoTokenizer

    shutil.copy(scoutlike_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(scoutlike_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    compiled = []
    from_string = jinja2.Environment.from_string
    monkeypatch.setattr(jinja2.Environment, "from_string",
                        lambda self, *args, **kwargs: compiled.append(1) or from_string(self, *args, **kwargs))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    conversations = [MESSAGES[:turns] for turns in (2, 4, 1, 3)]
    expected = [hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    ours = Tokenizer.load(tmp_path)
    compiled.clear()  # transformers' own
    assert [ours.render_chat(c) for c in conversations] == expected
    assert len(compiled) == 1
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE.replace("{% endfor %}", ""))
    broken = Tokenizer.load(tmp_path)
    for _ in range(2):
        with pytest.raises(GenerationError, match=r"^chat_template.jinja: the chat template does not compile "
                                                  r"\(TemplateSyntaxError: .*\); fix it or re-copy it from the checkpoint$"):
            broken.render_chat(MESSAGES)
