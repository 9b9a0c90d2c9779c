"""llama4-serve on a vision artifact (the tiny-a fixture checkpoint, exported once with 32-token prefill pieces so an
image's patch tokens are cut across pieces and attention chunks): chat messages with image data URLs through the
official `openai` client, equal to Generator alone with the same images; two image requests batched together; bad
images as 400s. Tools through the checkpoint's own chat template (Llama 4's, copied to the artifact as
chat_template.jinja), checked against transformers' apply_chat_template."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install .[serve])")
openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install .[serve])")

from llama4_export.pipeline import QuantOptions, export  # noqa: E402
from llama4_export.runtime import Generator  # noqa: E402
from llama4_export.runtime.errors import GenerationError, ImageTooLarge  # noqa: E402
from llama4_export.serving.protocol import ChatCompletionRequest, parse  # noqa: E402
from llama4_export.weights import CheckpointWeights  # noqa: E402

from .conftest import VISION_FIXTURES, llama4_serve  # noqa: E402

MODEL = "tiny-vision"
MAX_IMAGE_PIXELS = 2_000_000  # the module server's --max-image-pixels: above every fixture image it is sent
IMAGES = VISION_FIXTURES / "images"
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def data_url(name: str) -> str:
    path = IMAGES / name
    return f"data:{MIME[path.suffix]};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_chat(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(name)}} for name in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-vision") / MODEL
    export(out, CheckpointWeights(VISION_FIXTURES / "tiny-a"), "fp32", quant=QuantOptions(report=False), max_prefill=32,
           show_progress=False)
    return out


@pytest.fixture(scope="module")
def generator(artifact):
    return Generator.load(artifact, threads=1)


@pytest.fixture(scope="module")
def served(artifact):
    """(base URL, openai client) of one llama4-serve on the artifact (2 rows) for the module."""
    with llama4_serve(artifact, "--max-batch", "2", "--threads", "1", "--model-name", MODEL,
                      "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-images", "150") as (base, _):
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, messages, max_tokens=12, **options):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          extra_body={"ignore_eos": True}, **options)


def test_image_parts_render_like_transformers(generator):
    """The template writes `<|image|>` where the image part is (transformers renders an image part so); expanding it
    gives the ids."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(VISION_FIXTURES / "tiny-a")
    messages = image_chat("Compare these.", "tall.webp", "tiny.png")
    text = hf.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                {"type": "text", "text": "Compare these."}]}],
                                  tokenize=False, add_generation_prompt=True)
    assert text.count("<|image|>") == 2
    processor = generator.image_encoder.processor
    grids = [processor.preprocess(IMAGES / name).grid for name in ("tall.webp", "tiny.png")]
    ids, features = generator.chat_inputs(messages)
    assert ids == hf(processor.expand_prompt(text, grids), add_special_tokens=False)["input_ids"]
    assert features.shape[0] == ids.count(generator.image_encoder.config.image_token_id)
    files = [{"role": "user", "content": [{"type": "image", "image": IMAGES / "tall.webp"},  # the Python API's form
                                          {"type": "image", "path": str(IMAGES / "tiny.png")},
                                          {"type": "text", "text": "Compare these."}]}]
    by_file, file_features = generator.chat_inputs(files)
    assert by_file == ids and (file_features == features).all()


def test_chat_with_an_image_equals_generator(served, generator):
    client = served[1]
    messages = image_chat("What is in this picture?", "panorama.jpg")
    expected = generator.chat(messages, 12, stop_tokens=[])
    assert len(expected.prompt_ids) > 2 * 32  # three prefill pieces, patch tokens in more than one
    response = ask(client, messages)
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    streamed = list(ask(client, messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected.text


def test_two_image_requests_batch_and_each_equals_its_single_run(served, generator):
    client = served[1]
    chats = [image_chat("What is in this picture?", "panorama.jpg"),
             image_chat("Which one is taller?", "tall.webp", "tiny.png")]
    expected = [generator.chat(m, 16, stop_tokens=[]).text for m in chats]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda m: ask(client, m, 16).choices[0].message.content, chats))
    assert answers == expected


def test_tools_render_like_transformers_and_the_reply_equals_generator(served, generator):
    """The checkpoint's template renders `tools` and a tool-call history: the request, parsed as the server parses it,
    gives transformers' ids; over HTTP the same length and the reply those ids give; a reply that is no tool call
    stays content, also streamed (held back while it might become one)."""
    from transformers import AutoTokenizer

    client = served[1]

    history = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Snow."}]
    reference = [*history[:2], {**history[2], "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo"}}}]}, history[3]]  # transformers takes arguments as a dict
    hf = AutoTokenizer.from_pretrained(VISION_FIXTURES / "tiny-a")
    text = hf.apply_chat_template(reference, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '"name": "get_weather"' in text and "<|python_start|>" in text
    hf_ids = hf(text, add_special_tokens=False)["input_ids"]
    body = json.dumps({"model": MODEL, "messages": history, "tools": TOOLS}).encode()
    assert parse(ChatCompletionRequest, body).engine_request(generator, None).prompt_ids == hf_ids  # the server's path
    expected = generator.generate(hf_ids, 12, stop_tokens=[])
    response = ask(client, history, tools=TOOLS)
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    message = response.choices[0].message
    assert message.content == expected.text and message.tool_calls is None
    streamed = list(ask(client, history, tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason == "length"


BAD = [
    ({"url": "data:image/png;base64,%%%not-base64%%%"}, "base64 payload does not decode"),
    ({"url": "data:image/png," + "iVBORw0KGgo="}, "the data URL is not base64-encoded"),
    ({"url": "data:text/plain;base64,aGk="}, "media type 'text/plain' is not an image type"),  # was "malformed"
    ({"url": f"data:image/png;base64,{base64.b64encode(b'not an image at all').decode()}"},
     "not a readable image (no image format recognised)"),  # not Pillow's repr of its file object
    ({"url": "https://example.com/cat.png"}, "only data:image/...;base64,... URLs are accepted"),
    ({"url": data_url("over_budget.png")}, "but the model's context is"),  # 150 images: tiles beyond the context
]


@pytest.mark.parametrize("image_url, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_images_get_400_and_the_next_request_succeeds(served, image_url, message):
    server, client = served
    parts = [{"type": "image_url", "image_url": image_url}] * (150 if "context" in message else 1)
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        *parts, {"type": "text", "text": "What is it?"}]}]}
    response = httpx.post(f"{server}/v1/chat/completions", content=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == "messages", error
    assert ask(client, image_chat("ok", "tiny.png"), 2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url("tiny.png")}}]},
     {"role": "user", "content": "What is it?"}],  # Llama 4's template keeps a system message's first text only
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("tiny.png")}},
                                  {"type": "text", "text": "and <|image|>?"}]}],  # a placeholder typed as text
    # image tokens typed as text beside an image: was a 400 with param null naming Generator.chat_inputs
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("tiny.png")}},
                                  {"type": "text", "text": "<|patch|><|patch|>What is it?"}]}],
], ids=["system-image", "typed-placeholder", "typed-patches"])
def test_images_the_chat_template_does_not_place_get_a_400_saying_why(served, messages):
    server, client = served
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": messages},
                          timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    expected = "the prompt text holds <|patch|> itself" if "<|patch|>" in json.dumps(messages) else "the chat template wrote"
    assert expected in error["message"] and error["param"] == "messages", error
    assert ask(client, image_chat("ok", "tiny.png"), 2).choices[0].finish_reason == "length"


def png_url(width: int, height: int) -> str:
    """A grey PNG of these dimensions as a data URL: a few KB even at 12 MP (it compresses to nearly nothing)."""
    data = io.BytesIO()
    Image.new("L", (width, height), 128).save(data, "PNG")
    return f"data:image/png;base64,{base64.b64encode(data.getvalue()).decode()}"


def test_an_image_over_max_image_pixels_gets_a_400_naming_it_and_one_at_the_limit_is_answered(served):
    """A small PNG of huge dimensions (13000 × 13000, a few hundred KB) was decoded whole: GBs and tens of seconds per
    request, for a model that sees it as a few tiles. --max-image-pixels now refuses it from its header, naming the
    part, its size, the limit and what to do; an image of exactly the limit is answered, and so is the next request."""
    client = served[1]
    phone_photo = [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": png_url(4000, 3000)}}]}]
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, phone_photo, 2)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == "messages" and error["code"] == "image_too_large", error
    assert error["message"] == ("messages[0].content[1]: the image is 4000 × 3000 = 12,000,000 pixels, over the limit "
                                "of 2,000,000 (llama4-serve --max-image-pixels); downscale it (the model only sees it "
                                "resized to a few tiles) or raise llama4-serve --max-image-pixels")
    at_limit = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(2000, 1000)}},
                                             {"type": "text", "text": "What is it?"}]}]
    assert ask(client, at_limit, 2).choices[0].finish_reason == "length"
    assert ask(client, image_chat("ok", "tiny.png"), 2).choices[0].finish_reason == "length"


def test_a_request_over_max_images_gets_a_400_before_any_is_decoded(served):
    """Every image of a request was decoded before the context check: with the per-image cap alone one 400 KB body of
    six 7200 × 7200 PNGs took 30 s and 0.9 GB. A request with more images than --max-images (150 on this server, for
    the bad-image test's context overflow) is refused before any is decoded — the last here is not even an image —;
    fewer across two messages are answered."""
    client = served[1]
    parts = [{"type": "image_url", "image_url": {"url": data_url(name)}} for name in ("tiny.png", "tall.webp")]
    not_an_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    many = [{"role": "user", "content": [parts[0], {"type": "text", "text": "and"}]},
            {"role": "assistant", "content": "Go on."},
            {"role": "user", "content": [*[parts[1]] * 149, not_an_image, {"type": "text", "text": "Compare them."}]}]
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, many, 2)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == "messages" and error["code"] == "too_many_images", error
    assert error["message"] == ("messages: 151 images, over this server's limit of 150 per request (llama4-serve "
                                "--max-images); send fewer, or raise llama4-serve --max-images")
    many[2]["content"][1:150] = []
    assert ask(client, many, 2).choices[0].finish_reason == "length"


def test_the_python_api_takes_a_pixel_limit_and_keeps_pillows_by_default(artifact, generator):
    """Generator.load(max_image_pixels=) limits every image it is given, chat_inputs(max_image_pixels=) one call's;
    without either, Pillow's decompression-bomb limit alone. A bad limit is refused before the artifact loads."""
    photo = [{"role": "user", "content": [{"type": "image", "url": png_url(2000, 1500)},
                                          {"type": "text", "text": "What is it?"}]}]
    assert generator.max_image_pixels is None and generator.chat_inputs(photo)[1] is not None
    with pytest.raises(ImageTooLarge, match=r"^messages\[0\]\.content\[0\]: the image is 2000 × 1500 = 3,000,000 "
                                            r"pixels, over the limit of 2,999,999 \(max_image_pixels\); downscale it"):
        generator.chat_inputs(photo, max_image_pixels=2_999_999)
    assert generator.chat_inputs(photo, max_image_pixels=3_000_000)[1] is not None
    for bad in (0, -1):
        with pytest.raises(GenerationError, match=rf"^max_image_pixels={bad}: must be an integer >= 1"):
            Generator.load(artifact, threads=1, max_image_pixels=bad)
    limited = Generator.load(artifact, threads=1, max_image_pixels=1000)
    with pytest.raises(ImageTooLarge, match=r"^images\[0\]: the image is 40 × 30 = 1,200 pixels, over the limit of "
                                            r"1,000 \(max_image_pixels\)"):
        limited.generate("<|image|> What is it?", 2, images=[png_url(40, 30)])
    assert limited.generate("<|image|> What is it?", 2, images=[IMAGES / "tiny.png"]).token_ids
