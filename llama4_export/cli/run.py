"""`llama4-run`: generate from an exported artifact (ONNX Runtime or TensorRT), or with --backend torch from a
checkpoint through the PyTorch reference. Imports neither torch nor the exporter unless --backend torch asks for it."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..errors import Llama4ExportError, needs_exporter
from ..progress import PrefillBar
from ..runtime import GenerationError, Generator
from ..runtime.generator import BACKENDS
from ..runtime.tokenizer import check_utf8
from .common import err_console, fail, piece_printer, run_cli, version_option

run_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Run an exported Llama 4 artifact.")


@run_app.command()
def run(
    directory: Path = typer.Argument(..., help="artifact directory (or, with --backend torch, a HF checkpoint)"),
    version: bool = version_option("llama4-run"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="text prompt (needs tokenizer.json in DIR)"),
    prompt_file: Optional[Path] = typer.Option(
        None, "--prompt-file", "-f", help="the text prompt from a UTF-8 file (- = stdin), less one final newline as "
                                          "editors end files with; for prompts too long for a command line"),
    ids: Optional[str] = typer.Option(None, "--ids", help='prompt as token ids, e.g. "1,2,3"'),
    chat: bool = typer.Option(False, "--chat", help="interactive chat: one user message per stdin line, "
                                                          "until EOF; Ctrl-C stops a reply"),
    system: Optional[str] = typer.Option(None, "--system", help="with --chat: the system message that opens the "
                                                                 "conversation"),
    images: Optional[List[str]] = typer.Option(  # str: a Path would turn https:// into https:/
        None, "--image", help="an image for the next <|image|> placeholder of --prompt (repeat for several, in order; "
                              "PNG, JPEG, WebP: any format Pillow reads). As Llama4Processor: the prompt needs exactly one <|image|> per --image, "
                              "a prompt without placeholders is refused. Needs an artifact exported from a multimodal "
                              "checkpoint",
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    top_p: float = typer.Option(1.0, "--top-p", help="1 = off"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1 = off"),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty",
                                            help="subtracted per earlier occurrence in the output, in [-2, 2]; 0 = off"),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty",
                                           help="subtracted once from every token already output, in [-2, 2]; 0 = off"),
    logit_bias: Optional[List[str]] = typer.Option(
        None, "--logit-bias", help="ID=BIAS added to that token's logit, bias in [-100, 100] (repeat for several; "
                                   "-100 all but bans the token, 100 forces it)"),
    seed: int = typer.Option(0, help="seed of the sampler"),
    stop: Optional[List[str]] = typer.Option(
        None, "--stop", help="end where the text first holds this string, cut before it (repeat for several)"),
    no_stop: bool = typer.Option(False, "--no-stop", help="generate exactly -n tokens: no stop tokens (as llama4-cpp "
                                                          "--no-stop and the benchmarks); --stop strings still end it"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they are generated"),
    window: Optional[int] = typer.Option(None, help="global-layer KV window W in tokens (default: the context, RAM-capped; on a GPU: `plan`'s W)"),
    sinks: int = typer.Option(4, help="sink tokens S kept forever once the sequence outgrows W"),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch | tensorrt"),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: ORT's choice)"),
    max_prefill_tokens: Optional[int] = typer.Option(
        None, "--max-prefill-tokens", help="the most prompt tokens fed per forward call (default: the artifact's "
                                           "prefill limit); lower bounds the prefill's activation memory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (prompt_ids, token_ids, text, stop_reason)"),
) -> None:
    """Generate a continuation of a prompt (greedy unless --temperature) with the sliding KV cache."""

    options = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    so_far: list = []  # the new tokens' events
    try:
        options["logit_bias"] = [_parse_bias(pair) for pair in logit_bias or ()]
        options["stop"] = stop
        if no_stop:
            options["stop_tokens"] = []
        if (prompt is not None) + (prompt_file is not None) + (ids is not None) + chat != 1:
            raise GenerationError("give exactly one of --prompt TEXT, --prompt-file FILE, --ids 1,2,3 or --chat")
        if prompt_file is not None:
            prompt = _read_prompt(prompt_file)
        for flag, text in (("--prompt", prompt), ("--system", system), *(("--stop", s) for s in stop or ())):
            check_utf8(flag, text or "")
        if no_stop and chat:
            raise GenerationError("--no-stop with --chat: a reply ends at the model's end-of-turn token; drop --no-stop")
        if system is not None and not chat:
            raise GenerationError("--system opens a --chat conversation: add --chat, or write it into --prompt")
        if images and prompt is None:
            raise GenerationError("--image goes with --prompt TEXT (its <|image|> placeholders place the images)")
        if as_json and (stream or chat):  # one JSON object is printed once the text is complete
            raise GenerationError(f"--json prints one object at the end: drop {'--stream' if stream else '--chat'} "
                                  "or --json")
        with err_console.status(f"loading {escape(str(directory))}"):
            generator = _generator(directory, backend, window, sinks, threads, max_prefill_tokens)
        if chat:
            _chat_loop(generator, stream, options, system)
            return
        tokens = _parse_ids(ids) if ids is not None else prompt
        result = _generate(generator, tokens, stream=_recorder(so_far, stream), images=images or (), **options)
    except Llama4ExportError as exc:
        fail(exc)
    except KeyboardInterrupt:
        _interrupted(so_far, stream, as_json)
    if as_json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "token_ids": result.token_ids, "text": result.text,
                          "stop_reason": result.stop_reason}))
    elif stream:
        print(flush=True)
    else:
        print(result.text if result.text is not None else ",".join(map(str, result.token_ids)))


def _recorder(events: list, stream: bool, after=lambda: None):
    """Stream callback keeping the new tokens' events for an interruption (without --stream nothing is printed until
    the end), and printing them with --stream; after() after each."""
    show = piece_printer() if stream else None

    def on_token(event) -> None:
        events.append(event)
        if show is not None:
            show(event)
        after()

    return on_token


def _interrupted(events: list, streamed: bool, as_json: bool) -> None:
    """Ctrl-C: what _stopped says, and status 130 as a shell gives."""
    _stopped(events, streamed, as_json)
    sys.exit(130)


def _stopped(events: list, streamed: bool, as_json: bool = False) -> None:
    """A generation stopped by Ctrl-C: the text so far unless it was streamed already (or --json, whose object
    describes a finished run), and one line saying so."""
    if events and streamed:
        print(flush=True)  # end the streamed line
    elif events and not as_json:
        texts = [e.text for e in events if e.text is not None]
        print("".join(texts) if texts else ",".join(str(e.token_id) for e in events if e.token_id is not None))
    err_console.print(f"stopped by SIGINT after {sum(e.token_id is not None for e in events)} new token(s)",
                      highlight=False)


def _generate(generator: Generator, prompt, after_piece=lambda: None, on_slid=None, **options):
    """generator.generate with a prefill bar on the terminal while a long prompt is fed; after_piece() after each
    prefill piece. A prompt (images expanded) longer than the global KV window W is fed all the same, sliding: once it
    is in, on_slid(its length) is called (default: a note saying so), as the user would not know otherwise."""
    bar = PrefillBar()
    on_slid = on_slid or (lambda total: _note_slid(generator, "the prompt", total))

    def on_prefill(done: int, total: int) -> None:
        bar(done, total)  # gone once the prompt is in, before the note
        if done >= total > generator.window:
            on_slid(total)
        after_piece()

    try:
        return generator.generate(prompt, on_prefill=on_prefill, **options)
    finally:
        bar.close()


def _note_slid(generator: Generator, what: str, tokens: int, later: str = "") -> None:
    """What the sliding cache kept of a prompt of `tokens` > W tokens: the global layers see its S sinks and its last
    W − S tokens, the rest no layer can attend to (README: "What changes once a sequence outgrows W")."""
    window, sinks, dropped = generator.window, generator.sinks, tokens - generator.window
    kept = (f"its first {sinks:,} (--sinks) and last {window - sinks:,} tokens; the {dropped:,} token(s) between were"
            if sinks else f"its last {window:,} tokens; the first {dropped:,} were")
    err_console.print(f"note: {what} is {tokens:,} tokens, more than the KV window of {window:,} (--window): the reply "
                      f"attends to {kept} dropped from attention{later}", markup=False, highlight=False, soft_wrap=True)


def _generator(directory: Path, backend: str, window: int | None, sinks: int, threads: int | None,
               max_prefill_tokens: int | None) -> Generator:
    """An artifact on ONNX Runtime / TensorRT; with --backend torch, the PyTorch reference on a checkpoint or on an
    unquantized artifact's weights (imported only then: it needs torch)."""
    if backend not in (*BACKENDS, "torch"):
        raise GenerationError(f"--backend {backend!r} is unknown; choose one of: {', '.join((*BACKENDS, 'torch'))}")
    if backend != "torch":
        return Generator.load(directory, backend=backend, window=window, sinks=sinks, threads=threads,
                              max_prefill_tokens=max_prefill_tokens)
    with needs_exporter():
        from ..evaluation.torch_backend import torch_generator

    return torch_generator(directory, window, sinks, max_prefill_tokens, threads)


def _read_prompt(path: Path) -> str:
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
        text = raw.decode("utf-8-sig")  # a BOM (Windows editors write one) was three prompt tokens
    except OSError as exc:
        raise GenerationError(f"--prompt-file {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise GenerationError(f"--prompt-file {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as "
                              "UTF-8") from None
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def _parse_bias(pair: str) -> tuple[int, float]:
    token, equals, bias = pair.partition("=")
    try:
        if equals:
            return int(token), float(bias)
    except ValueError:
        pass
    raise GenerationError(f"--logit-bias {pair!r}: expected ID=BIAS, e.g. 42=-100")


def _parse_ids(text: str) -> list[int]:
    text = text.replace(" ", "")
    try:
        return [int(t) for t in text.split(",")] if text else []  # an empty field ("1,,2") is a typo, not nothing
    except ValueError:
        raise GenerationError(f"--ids {text!r}: expected comma-separated integers, e.g. \"1,2,3\"") from None


class _ChatSigint:
    """The SIGINT handler of --chat. At the prompt it ends the chat, raising KeyboardInterrupt (130, as a prompt's run
    ends). Elsewhere it only asks the reply to stop: the stream and prefill callbacks raise it (check), where the
    Generator expects an exception; raised wherever the main thread stood, it could land in the Generator's cleanup or
    lock, or amid a print, and leave them broken for the rest of the chat. One that comes after the reply's last check
    is dropped as the next prompt shows: it was meant for that reply, not the chat."""

    def __init__(self) -> None:
        self.at_prompt = self.stop_asked = False

    def __call__(self, signum, frame) -> None:
        if self.at_prompt:
            raise KeyboardInterrupt
        self.stop_asked = True

    def check(self) -> None:
        if self.stop_asked:
            raise KeyboardInterrupt


def _chat_loop(generator, stream: bool, options: dict, system: str | None) -> None:
    """Each stdin line is a user turn; the whole conversation is re-rendered and re-fed every turn. Ctrl-C during a
    reply stops it (its text so far printed as a prompt's run prints it, and kept as the turn) and the chat goes on;
    at the prompt it ends the chat (130), as EOF does (0)."""
    messages: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
    interactive = sys.stdin.isatty()
    so_far: list = []  # the reply's events
    sigint = _ChatSigint()
    slid = False  # noted once: the conversation only grows, so every later turn slides too

    def on_slid(tokens: int) -> None:
        nonlocal slid
        if not slid:
            _note_slid(generator, "the conversation (re-fed whole every turn)", tokens,
                       "; every later turn, longer still, drops more (not said again)")
        slid = True

    previous = signal.signal(signal.SIGINT, sigint)
    try:
        for number in itertools.count(1):
            sigint.stop_asked = False
            if interactive:
                err_console.print("[bold]>[/] ", end="")
            try:
                sigint.at_prompt = True
                sigint.check()  # one that came while the prompt was printed
                raw = sys.stdin.buffer.readline()  # bytes: one not UTF-8 was a traceback (locale, tokenizers)
            except KeyboardInterrupt:
                if interactive:
                    err_console.print()  # the "stopped" line followed the "> " prompt
                raise
            sigint.at_prompt = False
            if not raw:  # EOF
                if interactive:
                    err_console.print()  # the shell's prompt followed the "> " prompt
                return
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM (Windows editors): 3 prompt tokens
            except UnicodeDecodeError as exc:
                raise GenerationError(f"stdin line {number}: not UTF-8 text (byte {exc.start}: {exc.reason}); send "
                                      "UTF-8") from None
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.strip()})
            try:
                reply = _generate(generator, generator.chat_prompt(messages), after_piece=sigint.check,
                                  on_slid=on_slid, stream=_recorder(so_far, stream, after=sigint.check), **options).text
            except KeyboardInterrupt:
                _stopped(so_far, stream)
                reply = "".join(event.text for event in so_far)  # as printed: the conversation goes on from it
            else:
                print("" if stream else reply, flush=True)
            finally:
                so_far.clear()
            messages.append({"role": "assistant", "content": reply})
    finally:
        signal.signal(signal.SIGINT, previous)


def main() -> None:
    # a closed pipe (`| head`) ends the run as it ends cat: at once, quietly, status 141 (it was 1 or 0 by the mode)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        run_cli(run_app)
    except OSError as exc:
        if exc.filename is not None:  # not a write to stdout
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again, noisily
        err_console.print(f"[bold red]error:[/] stdout: {exc.strerror or exc}; nothing more can be written there",
                          highlight=False)
        sys.exit(2)
