"""`llama4-run`: output against the model's own greedy argmax, and every bad input as one line with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llama4_export import api
from llama4_export.artifact import write_manifest
from llama4_export.cli.run import run_app
from llama4_export.weights import from_preset, load
from llama4_export.model.save import save_checkpoint
from llama4_export.runtime import Generator


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint without tokenizer.json (prompts must be ids)."""
    return save_checkpoint(from_preset("scout-tiny", seed=2), tmp_path_factory.mktemp("tiny") / "ckpt", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """scout-tiny (random weights, its byte-level tokenizer) exported for ONNX Runtime."""
    out = tmp_path_factory.mktemp("artifact") / "tiny"
    api.export_model(out, model="scout-tiny", layers=2, random_weights=True, show_progress=False,
                     quant=api.QuantOptions(report=False))
    return out


PROMPT = "The history of"


def run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(run_app, [str(a) for a in args], input=stdin)


def full_forward_argmax(model, prompt: list[int], tokens: list[int]) -> list[int]:
    """Entry k: the greedy pick after prompt + tokens[:k], from one full forward without cache."""
    with torch.no_grad():
        return model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1 :].argmax(-1).tolist()


def test_ids_prompt_prints_the_greedy_continuation(tiny_checkpoint):
    result = run(tiny_checkpoint, "--backend", "torch", "--ids", "5, 6,7,8", "-n", "20", "--window", "12", "--sinks", "2")
    assert result.exit_code == 0, result.output
    printed = [int(t) for t in result.stdout.strip().split(",")]
    exact = printed[: 12 - 4 + 1]  # new tokens at positions <= W saw every past token
    assert len(printed) == 20 and exact == full_forward_argmax(load(tiny_checkpoint), [5, 6, 7, 8], exact)
    streamed = run(tiny_checkpoint, "--backend", "torch", "--ids", "5,6,7,8", "-n", "20", "--window", "12", "--sinks", "2", "--stream")
    assert streamed.exit_code == 0 and streamed.stdout == result.stdout


def test_no_stop_generates_exactly_n_tokens_past_the_end_of_text_token(tiny_artifact):
    """--no-stop, as llama4-cpp's: no stop tokens. The logit bias makes end-of-text the greedy pick every step."""
    eos = json.loads((tiny_artifact / "generation_config.json").read_text())["eos_token_id"]
    args = [tiny_artifact, "--ids", "5,6,7", "-n", "6", "--logit-bias", f"{eos}=100", "--json"]
    stopped, kept = json.loads(run(*args).stdout), json.loads(run(*args, "--no-stop").stdout)
    assert (stopped["token_ids"], stopped["stop_reason"]) == ([eos], "stop")
    assert (kept["token_ids"], kept["stop_reason"]) == ([eos] * 6, "length")
    result = run(tiny_artifact, "--chat", "--no-stop", stdin="hi\n")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--no-stop with --chat" in result.output


def test_text_prompt_json_and_stream_agree(scoutlike_dir):
    args = [scoutlike_dir, "--backend", "torch", "--prompt", "The river", "-n", "16"]
    as_json = run(*args, "--json")
    assert as_json.exit_code == 0, as_json.output
    out = json.loads(as_json.stdout)
    model = load(scoutlike_dir)
    tokens = out["token_ids"]
    assert out["prompt_ids"][0] == 1021  # the tokenizer's <|begin_of_text|>
    assert tokens == full_forward_argmax(model, out["prompt_ids"], tokens)
    # Greedy until eos 1022 (generation_config) or 16 tokens.
    assert (len(tokens), out["stop_reason"]) == (16, "length") or (tokens[-1], out["stop_reason"]) == (1022, "stop")
    assert 1022 not in tokens[:-1]
    streamed = run(*args, "--stream")
    plain = run(*args)
    assert streamed.exit_code == plain.exit_code == 0
    assert streamed.stdout == plain.stdout == out["text"] + "\n"


def test_chat_answers_every_stdin_line_with_the_conversation_so_far(tiny_artifact):
    """The conversation so far, re-rendered by scout-tiny's chat template every turn."""
    result = run(tiny_artifact, "--chat", "-n", "6", stdin="Hello there\n\nWhat is a river?\n")
    assert result.exit_code == 0, result.output
    gen = Generator.load(tiny_artifact, threads=1)
    first = gen.generate(gen.chat_prompt([{"role": "user", "content": "Hello there"}]), max_new_tokens=6).text
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What is a river?"}]
    second = gen.generate(gen.chat_prompt(history), max_new_tokens=6).text
    assert result.stdout == f"{first}\n{second}\n"
    system = [{"role": "system", "content": "Answer in one word."}]
    opened = run(tiny_artifact, "--chat", "--system", system[0]["content"], "-n", "6", stdin="Hello there\n")
    assert opened.exit_code == 0, opened.output
    answer = gen.generate(gen.chat_prompt([*system, {"role": "user", "content": "Hello there"}]), max_new_tokens=6)
    assert opened.stdout == f"{answer.text}\n" and answer.text != first


def test_chat_without_a_template_or_the_chat_tokens_is_refused_in_one_line(scoutlike_dir):
    """l4-scoutlike's tokenizer has no chat template and no <|header_start|>: the built-in format's markers were spelled
    out in bytes (a 57-token prompt for "Hi" whose turn the model could never end)."""
    result = run(scoutlike_dir, "--backend", "torch", "--chat", "-n", "6", stdin="Hello there\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: tokenizer_config.json: no chat template, and the vocabulary lacks Llama 4's chat tokens "
        "(<|header_start|>, <|header_end|>, <|eot|>); give the prompt as text (a completion), or add the checkpoint's "
        "chat_template"], result.output


def test_a_prompt_from_a_file_or_stdin_and_the_penalties_generate_as_the_python_api(tmp_path, tiny_artifact):
    """--prompt-file (a prompt too long for a command line; its editor's final newline is not part of it) and
    --frequency-penalty / --presence-penalty / --logit-bias, which only the Python API and the server had."""
    text = "The history of\nrivers, in two lines"
    (tmp_path / "prompt.txt").write_text(text + "\n", encoding="utf-8")
    (tmp_path / "bom.txt").write_text(text, encoding="utf-8-sig")  # Windows editors' BOM: it was 3 prompt tokens
    generator = Generator.load(tiny_artifact, threads=1)
    expected = generator.generate(text, max_new_tokens=24)
    for args, stdin in ((["--prompt-file", tmp_path / "prompt.txt"], None), (["-f", tmp_path / "bom.txt"], None),
                        (["-f", "-"], text + "\r\n")):
        result = run(tiny_artifact, *args, "-n", "24", "--json", stdin=stdin)
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert (out["prompt_ids"], out["token_ids"]) == (expected.prompt_ids, expected.token_ids)
    penalised = generator.generate(text, max_new_tokens=24, frequency_penalty=1.5, presence_penalty=0.5,
                                   logit_bias={65: 3.0, 66: -100.0})
    assert penalised.token_ids != expected.token_ids  # this model repeats itself: the penalties change its output
    result = run(tiny_artifact, "--prompt", text, "-n", "24", "--frequency-penalty", "1.5", "--presence-penalty", "0.5",
                 "--logit-bias", "65=3", "--logit-bias", "66=-100", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["token_ids"] == penalised.token_ids


def test_compare_checks_an_optimized_preset_artifact_against_its_seeded_weights(tiny_artifact, tiny_checkpoint):
    """The default export's graphs no longer hold the weights as the model names them; compare rebuilds the preset's
    seeded random weights the manifest records (a --checkpoint for it is refused, not ignored)."""
    from llama4_export.cli.export import export_app

    shown = CliRunner().invoke(export_app, ["compare", str(tiny_artifact)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "PyTorch reference: preset scout-tiny (random weights, seed 0" in shown.output
    for graph in ("decode", "prefill"):
        line = next(line for line in shown.output.splitlines() if line.startswith(f"{graph}: onnxruntime vs pytorch"))
        assert float(line.split("max deviation ")[1].split(" ")[0]) < 1e-4, line
    refused = CliRunner().invoke(export_app, ["compare", str(tiny_artifact), "--checkpoint", str(tiny_checkpoint)])
    assert refused.exit_code == 2 and "exported from the random weights of preset 'scout-tiny'" in refused.output
    rebuilt = CliRunner().invoke(export_app, ["rebuild", str(tiny_artifact), "--checkpoint", str(tiny_checkpoint)])
    assert rebuilt.exit_code == 2 and "drop --checkpoint" in rebuilt.output, rebuilt.output  # was ignored
    files = {f: f.read_bytes() for f in tiny_artifact.iterdir()}
    into_itself = CliRunner().invoke(export_app, ["rebuild", str(tiny_artifact), "--out", str(tiny_artifact)])
    assert into_itself.exit_code == 2 and "is the artifact being rebuilt" in into_itself.output, into_itself.output
    assert {f: f.read_bytes() for f in tiny_artifact.iterdir()} == files  # it was replaced, verdict or not
    benched = CliRunner().invoke(export_app, ["bench", str(tiny_artifact), "--json", str(tiny_artifact)])
    assert benched.exit_code == 2 and "is a directory; give a file path" in benched.output  # after the measuring


def test_the_torch_backend_runs_an_optimized_preset_artifact_on_its_recorded_weights(tiny_artifact):
    """Its graphs' expert weights are fused, so --backend torch failed on every default export; a preset's artifact
    records its seeded weights, and the PyTorch reference on them chooses the tokens ONNX Runtime does."""
    args = [tiny_artifact, "--prompt", PROMPT, "-n", "24", "--json"]
    on_torch, on_ort = run(*args, "--backend", "torch"), run(*args)
    assert on_torch.exit_code == 0 and on_ort.exit_code == 0, on_torch.output
    assert json.loads(on_torch.stdout)["token_ids"] == json.loads(on_ort.stdout)["token_ids"]


def on_a_terminal(*args) -> tuple[int, str, str]:
    """llama4-run in a subprocess whose stderr is a pseudo-terminal (so rich draws there); stdout is a pipe."""
    import os
    import subprocess
    import sys

    controller, terminal = os.openpty()
    command = [sys.executable, "-c", "from llama4_export.cli.run import main; main()", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=terminal, env={**os.environ, "COLUMNS": "100"})
    os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        drawn += chunk
    os.close(controller)
    printed = process.stdout.read()
    return process.wait(timeout=60), printed.decode(), drawn.decode(errors="replace")


def test_a_long_prompt_shows_a_prefill_bar_on_a_terminal_only_and_pieces_keep_the_tokens(tmp_path, tiny_artifact):
    """--max-prefill-tokens feeds the prompt in smaller pieces (same tokens); while it is fed a terminal shows a bar
    counting its tokens, gone before the output; stdout and a stderr that is not a terminal get none of it."""
    text = "The history of rivers, " * 20
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    expected = Generator.load(tiny_artifact, threads=1).generate(text, max_new_tokens=8)
    total = len(expected.prompt_ids)
    assert total > 3 * 64
    code, printed, drawn = on_a_terminal(tiny_artifact, "-f", tmp_path / "prompt.txt", "-n", "8", "--json",
                                         "--max-prefill-tokens", "64")
    assert code == 0, drawn
    assert json.loads(printed)["token_ids"] == expected.token_ids
    assert "prefill" in drawn and f"128/{total}" in drawn and f"{total}/{total}" in drawn
    assert drawn.rstrip().endswith("\x1b[2K")  # the last thing drawn erases the bar's line
    piped = run(tiny_artifact, "-f", tmp_path / "prompt.txt", "-n", "8", "--json", "--max-prefill-tokens", "64")
    assert piped.exit_code == 0 and "prefill" not in piped.stderr
    assert json.loads(piped.stdout)["token_ids"] == expected.token_ids
    code, printed, drawn = on_a_terminal(tiny_artifact, "--prompt", "Short", "-n", "8", "--max-prefill-tokens", "64")
    assert code == 0 and "prefill" not in drawn  # one piece: no bar


def test_a_prompt_longer_than_the_kv_window_gets_one_note_and_the_python_apis_tokens(tiny_artifact):
    """A prompt over the global KV window W ran silently on the sliding cache, its middle dropped from attention (where
    llama4-serve refuses one over the context). Now one note on stderr says so from W + 1 tokens on; stdout and the
    exit status are as before. In --chat it comes once, at the first turn over W: every later turn is longer still."""
    window, sinks = 16, 2
    gen = Generator.load(tiny_artifact, window=window, sinks=sinks, threads=1)
    for length, sinks_flag in ((window - 1, sinks), (window, sinks), (window + 1, sinks), (window + 9, sinks), (20, 0)):
        ids = list(range(5, 5 + length))
        result = run(tiny_artifact, "--ids", ",".join(map(str, ids)), "-n", "4", "--window", window, "--sinks",
                     sinks_flag, "--threads", 1, "--json")
        assert result.exit_code == 0, result.output
        reference = gen if sinks_flag == sinks else Generator.load(tiny_artifact, window=window, sinks=0, threads=1)
        assert json.loads(result.stdout)["token_ids"] == reference.generate(ids, max_new_tokens=4).token_ids
        kept = (f"its first {sinks} (--sinks) and last {window - sinks} tokens; the {length - window} token(s) "
                "between were" if sinks_flag else f"its last {window} tokens; the first {length - window} were")
        assert result.stderr.splitlines() == ([] if length <= window else [
            f"note: the prompt is {length} tokens, more than the KV window of {window} (--window): the reply attends "
            f"to {kept} dropped from attention"]), length

    first_turn = gen.chat_prompt([{"role": "user", "content": "Hello there"}])
    chat = Generator.load(tiny_artifact, window=len(first_turn), threads=1)  # the first turn fits W exactly
    conversation, replies = [], []
    for line in ("Hello there", "What is a river?", "And a lake?"):
        conversation.append({"role": "user", "content": line})
        replies.append(chat.generate(chat.chat_prompt(conversation), max_new_tokens=4).text)
        conversation.append({"role": "assistant", "content": replies[-1]})
    second_turn = len(chat.chat_prompt(conversation[:3]))
    result = run(tiny_artifact, "--chat", "-n", "4", "--window", len(first_turn), "--threads", 1,
                 stdin="Hello there\nWhat is a river?\nAnd a lake?\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(f"{reply}\n" for reply in replies)
    assert result.stderr.splitlines() == [
        f"note: the conversation (re-fed whole every turn) is {second_turn} tokens, more than the KV window of "
        f"{len(first_turn)} (--window): the reply attends to its first 4 (--sinks) and last {len(first_turn) - 4} "
        f"tokens; the {second_turn - len(first_turn)} token(s) between were dropped from attention; every later turn, "
        "longer still, drops more (not said again)"]


def test_stop_strings_cut_the_text_before_the_first_one_and_end_there(tiny_artifact):
    """`stop` (Generator and llama4-run --stop): the text up to the first stop string of the unstopped run, the tokens
    up to the one completing it (checked with `tokenizers`' own decode), the streamed pieces joining to it."""
    from tokenizers import Tokenizer as HfTokenizer

    decode = HfTokenizer.from_file(str(tiny_artifact / "tokenizer.json")).decode
    generator = Generator.load(tiny_artifact, threads=1)
    full = generator.generate(PROMPT, max_new_tokens=40)
    # three characters well inside the text, none of them a replaced byte (random weights write invalid UTF-8)
    stop = next(full.text[i:i + 3] for i in range(10, len(full.text)) if "\ufffd" not in full.text[i:i + 3])
    cut = full.text[:full.text.index(stop)]
    result = generator.generate(PROMPT, max_new_tokens=40, stop=[stop, "never there"])
    tokens = result.token_ids
    assert (result.text, result.stop_reason, tokens) == (cut, "stop", full.token_ids[:len(tokens)])
    assert stop in decode(tokens) and stop not in decode(tokens[:-1])
    events = list(generator.stream(PROMPT, max_new_tokens=40, stop=stop))
    assert "".join(e.text for e in events) == cut and [e.stop_string for e in events][-1] is True
    printed = run(tiny_artifact, "--prompt", PROMPT, "-n", "40", "--stop", "never there", "--stop", stop, "--json")
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout) == {"prompt_ids": result.prompt_ids, "token_ids": tokens, "text": cut,
                                          "stop_reason": "stop"}
    streamed = run(tiny_artifact, "--prompt", PROMPT, "-n", "40", "--stop", stop, "--stream")
    assert streamed.stdout == cut + "\n"


def break_missing_dir(tmp_path, ckpt):
    return [tmp_path / "nope", "--ids", "1"], "artifact directory not found"


def break_checkpoint_for_artifact(tmp_path, ckpt):  # said "manifest.json: missing ... (re-run the export)"
    return [ckpt, "--ids", "1"], "a Hugging Face checkpoint (config.json, no manifest.json), not an exported artifact: " \
                                 "export it (llama4-export --checkpoint"


def break_file_for_dir(tmp_path, ckpt):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    return [tmp_path / "model.onnx", "--ids", "1"], "a file, not an artifact directory"


def break_hash_mismatch(tmp_path, ckpt):
    art = tmp_path / "art"
    art.mkdir()
    (art / "decode.onnx").write_bytes(b"graph")
    write_manifest(art, {"graphs": {}})
    (art / "decode.onnx").write_bytes(b"tampered")
    return [art, "--ids", "1"], "sha256 does not match"


def break_incomplete_artifact(tmp_path, ckpt):
    art = tmp_path / "art"
    art.mkdir()
    (art / "decode.onnx").write_bytes(b"graph")
    write_manifest(art, {"graphs": {}})
    (art / "decode.onnx").unlink()
    return [art, "--ids", "1"], "listed in manifest.json but missing"


def break_id_outside_vocab(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "3,512"], "prompt token 1 is id 512, outside the vocabulary 0..511"


def break_negative_id(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "-4"], "id -4, outside the vocabulary"


def break_unparsable_ids(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1,x"], "expected comma-separated integers"


def break_an_empty_id_field(tmp_path, ckpt):  # "1,,2" ran as 1,2
    return [ckpt, "--backend", "torch", "--ids", "1,,2"], "expected comma-separated integers"


def break_torch_threads(tmp_path, ckpt):  # --threads was ignored by the torch backend, any value
    return [ckpt, "--backend", "torch", "--ids", "1", "--threads", "-2"], "threads=-2: must be in 1..1024"


def break_empty_ids(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", ""], "the prompt is empty"


def break_text_without_tokenizer(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--prompt", "hi"], "has no tokenizer.json; pass token ids"


def break_window_below_sinks(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1", "--window", "4", "--sinks", "4"], "window=4 with sinks=4"


def break_no_prompt(tmp_path, ckpt):
    return [ckpt, "--backend", "torch"], "give exactly one of --prompt TEXT, --prompt-file FILE, --ids 1,2,3 or --chat"


def break_unknown_backend(tmp_path, ckpt):
    return [ckpt, "--backend", "tensorflow", "--ids", "1"], \
        "--backend 'tensorflow' is unknown; choose one of: onnxruntime, tensorrt, torch"


def break_bad_temperature(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1", "--temperature", "-1"], "temperature=-1.0: must be >= 0"


def break_prompt_file_missing(tmp_path, ckpt):
    return [ckpt, "--prompt-file", tmp_path / "nope.txt"], f"--prompt-file {tmp_path / 'nope.txt'}: cannot read it"


def break_prompt_file_not_utf8(tmp_path, ckpt):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    return [ckpt, "--prompt-file", tmp_path / "latin1.txt"], "latin1.txt: not UTF-8 text (byte 3: "


def break_prompt_and_prompt_file(tmp_path, ckpt):
    return [ckpt, "--prompt", "x", "-f", "-"], "give exactly one of --prompt TEXT, --prompt-file FILE, --ids"


def break_bad_frequency_penalty(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1", "--frequency-penalty", "3"], "frequency_penalty=3.0: must be in"


def break_logit_bias_without_value(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1", "--logit-bias", "5:1"], "--logit-bias '5:1': expected ID=BIAS"


def break_logit_bias_outside_vocabulary(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1", "--logit-bias", "512=1"], \
        "logit_bias: token 512 is outside the vocabulary of 512 tokens"


def break_stop_without_tokenizer(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1", "--stop", "x"], "stop strings need the artifact's tokenizer"


def break_system_without_chat(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1", "--system", "x"], "--system opens a --chat conversation"


def break_json_with_stream(tmp_path, ckpt):  # --stream was ignored
    return [ckpt, "--backend", "torch", "--ids", "1", "--json", "--stream"], "--json prints one object at the end"


def break_max_prefill_tokens_zero(tmp_path, ckpt):
    return [ckpt, "--backend", "torch", "--ids", "1", "--max-prefill-tokens", "0"], "max_prefill_tokens=0: must be >= 1"


def break_json_with_chat(tmp_path, ckpt):  # --json was ignored
    return [ckpt, "--backend", "torch", "--chat", "--json"], "drop --chat or --json"


BREAKERS = [v for k, v in sorted(globals().items()) if k.startswith("break_")]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_errors_print_one_line_and_exit_2(tmp_path, tiny_checkpoint, breaker):
    args, expected = breaker(tmp_path, tiny_checkpoint)
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_every_command_line_prints_the_installed_version():
    """--version on each CLI prints the version pip installed (the package metadata, so __init__'s copy cannot drift
    from pyproject.toml) and exits 0 without loading anything."""
    from importlib.metadata import version

    from llama4_export.cli.export import export_app
    from llama4_export.cli.serve import serve_app

    for name, app in [("llama4-export", export_app), ("llama4-run", run_app), ("llama4-serve", serve_app)]:
        result = CliRunner().invoke(app, ["--version"])
        assert result.exit_code == 0 and result.stdout == f"{name} {version('llama4-export')}\n", result.output


def test_every_help_text_prints_as_written():
    """typer renders help through rich markup, which ate "[ray]" from "pip install .[ray]": every command's and
    option's help must render to its own text (a literal bracket written as "\\[")."""
    import typer
    from rich.text import Text

    from llama4_export.cli.export import export_app
    from llama4_export.cli.serve import serve_app

    for app in (export_app, run_app, serve_app):
        command = typer.main.get_command(app)
        # a group's subcommands by duck type: typer now vendors click, so its groups are not the installed click's Group
        for each in [command, *getattr(command, "commands", {}).values()]:
            for text in [each.help, *(getattr(p, "help", None) for p in each.params)]:
                if text:
                    assert Text.from_markup(text).plain == text.replace("\\[", "["), (each.name, text)
    shown = CliRunner().invoke(serve_app, ["--help"], env={"COLUMNS": "200"})
    assert "pip install '.[ray]'" in shown.output, shown.output


def test_threads_beyond_any_machine_are_refused_in_one_line(tiny_artifact):
    """--threads 99999999999 was an OverflowError traceback, 1,000,000 grew to 10 GB before anything ran."""
    for threads in ("99999999999", "1000000"):
        result = run(tiny_artifact, "--ids", "1", "--threads", threads)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.stderr.strip().splitlines() == [f"error: threads={threads}: must be in 1..1024 (or left out / 0 "
                                                      "for the runtime's choice)"], result.stderr


def test_a_hand_edited_manifest_is_refused_in_one_line(tiny_artifact, tmp_path):
    """A prefill limit of -4 ran (llama4rt failed in ONNX Runtime naming no field); a chunk size of 0 killed llama4rt
    with SIGFPE. Both runtimes now refuse them by name (test_cpp.py has llama4rt's side). A model config the graphs
    disagree with failed in ONNX Runtime's run, a section of the wrong type where it was read (tracebacks)."""

    model = json.loads((tiny_artifact / "manifest.json").read_text())["model"]
    for k, (field, edit) in enumerate((
            ("graphs.prefill.max_new_tokens=-4: must be an integer >= 1",
             lambda m: m["graphs"]["prefill"].update(max_new_tokens=-4)),
            ("attention_chunk_size=0: must be >= 1", lambda m: m["model"].update(attention_chunk_size=0)),
            (f"model.vocab_size={model['vocab_size'] - 1}, but the graph's logits has {model['vocab_size']}",
             lambda m: m["model"].update(vocab_size=model["vocab_size"] - 1)),
            (f"model.head_dim=8, but the graph's past_key.0 has {model['head_dim']}",
             lambda m: m["model"].update(head_dim=8)),
            (f"model.num_key_value_heads=1, but the graph's past_key.0 has {model['num_key_value_heads']}",
             lambda m: m["model"].update(num_key_value_heads=1)),
            ('vision="x": not an object', lambda m: m.update(vision="x")),
            ('layers=["0", "8"]: not a part\'s [first, end) layer range', lambda m: m.update(layers=["0", "8"])))):
        assert_refused_in_one_line(tiny_artifact, tmp_path / str(k), edit, field)


def test_a_manifest_naming_files_outside_the_artifact_is_refused_in_one_line(tiny_artifact, tmp_path):
    """A `files` name "../x" or absolute was hashed outside the artifact; a graph file `files` does not list (another
    directory's, absolute) was loaded unverified and ran, a number was a TypeError traceback. Refused by field now."""
    import hashlib
    import shutil

    outside = Path(shutil.copytree(tiny_artifact, tmp_path / "outside")) / "prefill.onnx"
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    for k, (field, edit) in enumerate((
            ("files['../outside/prefill.onnx']: not a path inside the artifact",
             lambda m: m["files"].update({"../outside/prefill.onnx": digest})),
            (f"files[{str(outside)!r}]: not a path inside the artifact", lambda m: m["files"].update({str(outside): digest})),
            (f"graphs.prefill.file={str(outside)!r}: not a file the artifact lists in `files`",
             lambda m: m["graphs"]["prefill"].update(file=str(outside))),
            ("graphs.prefill.file='../outside/prefill.onnx': not a file the artifact lists",
             lambda m: m["graphs"]["prefill"].update(file="../outside/prefill.onnx")),
            ("graphs.decode.file=5: not a file the artifact lists", lambda m: m["graphs"]["decode"].update(file=5)))):
        assert_refused_in_one_line(tiny_artifact, tmp_path / str(k), edit, field)


def assert_refused_in_one_line(artifact: Path, copy: Path, edit, expected: str) -> None:
    """llama4-run on a copy of `artifact` whose manifest `edit` changed: exit 2, one stderr line holding `expected`."""
    import shutil

    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run(copy, "--ids", "1,2,3", "-n", "2")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_the_python_api_takes_numpy_seeds_and_text_parts_and_refuses_bad_arguments_in_one_line(tiny_artifact):
    """From a walk through the Python API: seed=np.int64(3) was an OverflowError; chat content as text parts failed in
    the presets' template ("can only concatenate str (not list)"); generate_batch("hello") ran five prompts; wrong
    argument types were TypeErrors / ValueErrors from deep inside (a callback's only after the prefill), and some
    were taken silently (token 1.5 as 1, stop token 99999, True as id 1, bytes as ids); an unknown provider fell back
    to the CPU behind ONNX Runtime's banner."""
    import numpy as np

    from llama4_export.runtime.errors import GenerationError

    gen = Generator.load(tiny_artifact, threads=1)
    assert gen.generate("Hi", 6, stop_tokens=np.array([5, 6])).token_ids == gen.generate("Hi", 6, stop_tokens=[5, 6]).token_ids
    for numpy_seed, seed in ((np.int64(3), 3), (np.int64(-1), -1), (np.uint64(2**64 - 1), -1)):
        assert gen.generate("Hi", 6, temperature=1.0, seed=numpy_seed).token_ids == \
            gen.generate("Hi", 6, temperature=1.0, seed=seed).token_ids
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}]
    assert gen.chat_prompt(parts) == gen.chat_prompt([{"role": "user", "content": "Hi there"}])
    for call, message in (
            (lambda: gen.generate_batch("hello", 2), "prompts: a str; generate_batch takes a list of prompts"),
            (lambda: gen.generate("Hi", True), "max_new_tokens=True: expected an integer"),
            (lambda: gen.generate("Hi", 2, logit_bias={"a": 1}), "logit_bias: key 'a' is not a token id"),
            (lambda: gen.generate("Hi", 2, logit_bias={1.5: 1}), "logit_bias: key 1.5 is not a token id"),
            (lambda: gen.generate("Hi", 2, logit_bias=[1, 2]), "logit_bias=[1, 2]: give {token id: bias}"),
            (lambda: gen.generate("Hi", 2, stop=5), "stop=5: give a non-empty string or a list of them"),
            (lambda: gen.generate("Hi", 2, stop_tokens=["a"]), "stop_tokens=['a']: give a list of token ids in 0..511"),
            (lambda: gen.generate("Hi", 2, stop_tokens=[99999]), "stop_tokens=[99999]: give a list of token ids"),
            (lambda: gen.generate("Hi", 2, stop_tokens=5), "stop_tokens=5: give a list of token ids"),
            (lambda: gen.generate("Hi", 2, on_prefill=5), "on_prefill=5: give a function, or None"),
            (lambda: gen.generate("Hi", 2, stream=5), "stream=5: give a function, or None"),
            (lambda: gen.stream("Hi", 2, on_prefill=5), "on_prefill=5: give a function, or None"),
            (lambda: gen.generate([True, 2], 2), "the prompt must be text or one flat sequence of integer token ids"),
            (lambda: gen.generate(b"Hello", 2), "the prompt must be text or one flat sequence of integer token ids"),
            (lambda: Generator.load(tiny_artifact, providers=["NopeExecutionProvider"]),
             "providers: 'NopeExecutionProvider' is not in this onnxruntime (it has "),
            (lambda: gen.generate_batch(None, 2), "prompts: a NoneType; generate_batch takes a list"),  # a TypeError
            (lambda: gen.generate_batch(["Hi"], 2, images=5), "images=5: give one list of images per prompt"),  # len()'s TypeError
            (lambda: Generator.load(tiny_artifact, providers="CPUExecutionProvider"),  # "'C' is not in …"
             "providers='CPUExecutionProvider': give a list, e.g. ['CPUExecutionProvider']")):
        with pytest.raises(GenerationError) as raised:
            call()
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value), str(raised.value)
    assert gen.generate("Hi", 4).token_ids == Generator.load(tiny_artifact, threads=1).generate("Hi", 4).token_ids


def test_a_closed_pipe_ends_the_run_quietly_and_a_full_stdout_is_one_line(tiny_artifact):
    """`llama4-run … | head -c 10`: a stream's run exited 1 (click's "broken pipe"), a plain one 0, --help 1; now each
    ends as cat does, by SIGPIPE, silently. A full disk under stdout (/dev/full) was a traceback."""
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-c", "from llama4_export.cli.run import main; main()", str(tiny_artifact), "--prompt",
               PROMPT, "-n", "400", "--stream"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(10)
    process.stdout.close()  # as `head` exits
    assert process.wait(timeout=120) == -signal.SIGPIPE
    assert process.stderr.read() == b""
    for stream in ([], ["--stream"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run(command[:-3] + ["-n", "3", *stream], stdout=full, stderr=subprocess.PIPE, text=True,
                                  timeout=120)
        assert done.returncode == 2 and done.stderr.splitlines() == [
            "error: stdout: No space left on device; nothing more can be written there"], done.stderr


def interrupted_after(tokens: int):
    """Generator.generate as Ctrl-C lands between two decode steps: KeyboardInterrupt from the callback of new token
    `tokens` + 1 (no stop tokens, so the count is reached)."""
    generate = Generator.generate

    def interrupted(self, prompt, stream=None, **options):
        def on_token(event):
            if on_token.seen == tokens:
                raise KeyboardInterrupt
            on_token.seen += 1
            if stream is not None:
                stream(event)
        on_token.seen = 0
        return generate(self, prompt, stream=on_token, **{**options, "stop_tokens": []})

    return interrupted


@pytest.mark.parametrize("flags", [[], ["--stream"], ["--json"]])
def test_ctrl_c_during_generation_keeps_the_text_so_far_and_exits_130(tiny_artifact, monkeypatch, flags):
    """Without --stream an interrupted run printed nothing and said nothing (status 130): now the text of the tokens
    so far (already shown when streamed; not with --json, whose object describes a finished run) and one stderr line.
    The interrupt is raised by the 6th new token's callback, as Ctrl-C lands between two decode steps."""
    expected = Generator.load(tiny_artifact, threads=1).generate(PROMPT, max_new_tokens=5, stop_tokens=[])
    monkeypatch.setattr(Generator, "generate", interrupted_after(5))
    result = run(tiny_artifact, "--prompt", PROMPT, "-n", 50, "--threads", 1, *flags)
    assert result.exit_code == 130, result.output
    assert result.stdout == ("" if flags == ["--json"] else expected.text + "\n")
    assert result.stderr.strip() == "stopped by SIGINT after 5 new token(s)"


def test_ctrl_c_during_a_chat_reply_stops_only_that_reply_and_at_the_prompt_ends_the_chat(tiny_artifact,
                                                                                             monkeypatch):
    """--chat interrupted mid-reply ended the whole chat (130), where llama-cli and ollama stop only the reply. Now
    the reply so far is printed as a prompt's run prints it, with its token count, kept as the assistant's turn, and
    the next line is answered; EOF then ends the chat (0). A Ctrl-C while the chat waits for a line (a real SIGINT,
    at a terminal's "> " prompt, which the stop line followed on the same line) still ends it (130); Ctrl-D there ends
    it (0) on a line of its own too."""
    import contextlib
    import os
    import pty
    import re
    import signal
    import subprocess
    import sys

    gen = Generator.load(tiny_artifact, threads=1)
    conversation = [{"role": "user", "content": PROMPT}]  # each reply's first 5 tokens end on a whole character
    first = gen.generate(gen.chat_prompt(conversation), max_new_tokens=5, stop_tokens=[]).text
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "More"}]
    second = gen.generate(gen.chat_prompt(conversation), max_new_tokens=5, stop_tokens=[]).text
    with monkeypatch.context() as patch:
        patch.setattr(Generator, "generate", interrupted_after(5))
        for flags in ([], ["--stream"]):
            result = run(tiny_artifact, "--chat", "-n", 50, "--threads", 1, *flags, stdin=f"{PROMPT}\nMore\n")
            assert result.exit_code == 0, result.output
            assert result.stdout == f"{first}\n{second}\n"
            assert result.stderr.splitlines() == ["stopped by SIGINT after 5 new token(s)"] * 2
    command = [sys.executable, "-c", "from llama4_export.cli.run import main; main()", str(tiny_artifact), "--chat",
               "--threads", "1"]
    # real SIGINTs mid-reply: replies that go on until stopped (end of turn banned, no length limit in reach)
    eos = json.loads((tiny_artifact / "generation_config.json").read_text())["eos_token_id"]
    process = subprocess.Popen(command + ["-n", "1000000", "--logit-bias", f"{eos}=-100", "--stream"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = process.stdout.fileno()
    for message in (PROMPT, "More"):
        process.stdin.write(f"{message}\n".encode())
        process.stdin.flush()
        assert os.read(out, 1 << 16), process.communicate()  # the reply is streaming
        process.send_signal(signal.SIGINT)
        said = process.stderr.readline().decode()
        assert re.fullmatch(r"stopped by SIGINT after [1-9]\d* new token\(s\)\n", said), said
        os.set_blocking(out, False)  # the rest of the reply: printed before that line
        with contextlib.suppress(BlockingIOError):
            while os.read(out, 1 << 16):
                pass
        os.set_blocking(out, True)
    process.stdin.close()
    assert process.wait(timeout=60) == 0
    terminal, stdin = pty.openpty()  # stdin a terminal: the chat prompts "> " on stderr
    process = subprocess.Popen(command + ["-n", "4"], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.write(terminal, f"{PROMPT}\n".encode())
    reply = process.stdout.readline()
    assert process.stderr.read(4) == b"> > "  # the chat waits for the next line
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    os.close(terminal), os.close(stdin)
    answer = gen.generate(gen.chat_prompt(conversation[:1]), max_new_tokens=4).text
    assert (reply + process.stdout.read()).decode() == answer + "\n"
    assert process.stderr.read().decode() == "\nstopped by SIGINT after 0 new token(s)\n"
    terminal, stdin = pty.openpty()  # Ctrl-D at the prompt: the shell's prompt followed "> " on its line
    process = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.write(terminal, b"\x04")
    assert process.wait(timeout=60) == 0 and process.stderr.read() == b"> \n"
    os.close(terminal), os.close(stdin)


def test_text_that_is_not_utf8_is_refused_in_one_line_naming_its_flag_or_stdin_line(tiny_artifact):
    """Argument bytes that are not UTF-8 reach Python as lone surrogates (--prompt, --system: tokenizers' TypeError
    traceback; --stop: never matched), and a --chat stdin line not UTF-8 was a UnicodeDecodeError or that TypeError
    by the locale. A chat file's BOM was three bytes of the first message."""
    for args, stdin, said in (
            (["--prompt", "Hi \udcff there"], None, "--prompt: not UTF-8 text (character 3 is an undecodable byte)"),
            (["--prompt", "Hi", "--stop", "\udcff"], None, "--stop: not UTF-8 text (character 0 is"),
            (["--chat", "--system", "\udcff"], "Hi\n", "--system: not UTF-8 text (character 0 is"),
            (["--chat"], b"Hello\n\xff\xfe there\n", "stdin line 2: not UTF-8 text (byte 0: invalid start byte)")):
        result = run(tiny_artifact, *args, "-n", "4", stdin=stdin)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {said}"), result.stderr
    gen = Generator.load(tiny_artifact, threads=1)
    answer = gen.generate(gen.chat_prompt([{"role": "user", "content": "Hello there"}]), max_new_tokens=6).text
    result = run(tiny_artifact, "--chat", "-n", "6", stdin="\ufeffHello there\r\n".encode())
    assert result.exit_code == 0 and result.stdout == answer + "\n", result.output


def test_an_artifact_path_that_is_not_utf8_is_refused_in_one_line_and_runs_from_inside(tiny_artifact, tmp_path,
                                                                                        monkeypatch):
    """A directory name with a byte that is not UTF-8 (b"lat\\xe9in", as Python's surrogate "\\udce9") failed as
    "prefill.onnx: ONNX Runtime cannot load it (incompatible constructor arguments); re-run the export": ONNX Runtime
    and tokenizers take paths as UTF-8 text. It now says so in one line; from inside, `.` runs it."""
    odd = tmp_path / "lat\udce9in"
    shutil.copytree(tiny_artifact, odd)
    result = run(odd, "--prompt", PROMPT, "-n", "4")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    shown = str(odd).encode("utf-8", "backslashreplace").decode()  # as the error line escapes the byte
    assert result.stderr.strip().splitlines() == [f"error: {shown}: the path is not UTF-8 (it has an undecodable byte), "
                                                  "which ONNX Runtime cannot open; rename the directory, link it under "
                                                  "a UTF-8 name, or run it from inside (`.`)"], result.stderr
    monkeypatch.chdir(odd)
    result = run(".", "--prompt", PROMPT, "-n", "4", "--json")
    assert result.exit_code == 0, result.output
    plain = json.loads(run(tiny_artifact, "--prompt", PROMPT, "-n", "4", "--json").stdout)
    assert json.loads(result.stdout)["token_ids"] == plain["token_ids"]


def test_threads_sharing_one_loaded_generator_each_get_their_solo_tokens(tiny_artifact, tmp_path, monkeypatch):
    """An application's worker pool (Flask's threads, a ThreadPoolExecutor) calling generate, generate_batch, stream
    and a stream callback on ONE Generator loaded from an artifact (ONNX Runtime, its cache bound to the sessions) at
    the same time: the calls take turns and each gets exactly the tokens it gets alone. A stream abandoned half-way
    in another thread (dropped, not closed) holds the Generator only until it is gone; Generator.load called from
    several threads at once on the same artifact (one fresh hash cache) gives each thread a working Generator."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # every load hashes the files, each writing verified.json
    start = threading.Barrier(3)

    def load():
        start.wait()
        return Generator.load(tiny_artifact, threads=1)

    with ThreadPoolExecutor(3) as pool:
        loaded = list(pool.map(lambda _: load(), range(3)))
    gen = loaded[0]
    prompts, new = [PROMPT, "Hi", "Once upon a time, in a land far away,", "Zebra"], 10
    solo = {p: Generator.load(tiny_artifact, threads=1).generate(p, new, stop_tokens=[]).token_ids for p in prompts}
    assert all(g.generate("Hi", new, stop_tokens=[]).token_ids == solo["Hi"] for g in loaded[1:])
    assert len(set(map(tuple, solo.values()))) == len(prompts)  # distinct: a swapped row would show

    def call(job: int):
        prompt = prompts[job % len(prompts)]
        if job % 4 == 0:
            return gen.generate(prompt, new, stop_tokens=[]).token_ids == solo[prompt]
        if job % 4 == 1:
            return [event.token_id for event in gen.stream(prompt, new, stop_tokens=[])] == solo[prompt]
        if job % 4 == 2:
            results = gen.generate_batch(prompts, new, stop_tokens=[])
            return [r.token_ids for r in results] == [solo[p] for p in prompts]
        streamed = []
        result = gen.generate(prompt, new, stop_tokens=[], stream=lambda event: streamed.append(event.token_id))
        return streamed == result.token_ids == solo[prompt]

    def abandon_a_stream():
        events = gen.stream(prompts[2], new, stop_tokens=[])
        return [next(events).token_id, next(events).token_id] == solo[prompts[2]][:2]  # then dropped, unfinished

    with ThreadPoolExecutor(6) as pool:
        outcomes = [pool.submit(abandon_a_stream) if job % 8 == 5 else pool.submit(call, job) for job in range(32)]
        done = [outcome.result(timeout=120) for outcome in outcomes]  # a deadlock fails here rather than hanging
    assert done == [True] * 32
    assert gen.generate(prompts[3], new, stop_tokens=[]).token_ids == solo[prompts[3]]
