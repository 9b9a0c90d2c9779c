"""Calibration data, statistics and cache: bad input gives one clear line, statistics match a direct computation,
the cache is deterministic and keyed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys


import numpy as np
import pytest
import torch

from llama4_export.calib.corpus import CalibrationError, cut_samples, embedded_corpus, load_corpus
from llama4_export.calib.layerwise import layerwise_statistics
from llama4_export.calib.stats import cache_key, load_cache, percentile_abs, save_cache
from llama4_export.pipeline import REPRODUCIBLE_CPU_NUMERICS, QuantOptions
from llama4_export.weights import RandomWeights, from_preset


def test_embedded_corpus_is_prose_deterministic_and_heldout_is_disjoint():
    calibration, heldout = embedded_corpus("calibration"), embedded_corpus("heldout")
    assert sum(map(len, calibration.texts)) > 100_000 and sum(map(len, heldout.texts)) > 20_000
    assert not set(calibration.texts) & set(heldout.texts)
    assert embedded_corpus("calibration").sha256 == calibration.sha256
    words = " ".join(calibration.texts).split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.6  # mostly words, not code or random tokens


def test_the_embedded_corpus_is_read_from_the_standard_library_without_warnings():
    """Reading docstrings attribute by attribute touched typing's deprecated io / re aliases: two DeprecationWarnings
    on Python 3.11 in any export that calibrated on the embedded corpus. The text is the same either way."""
    import warnings

    from llama4_export.calib import corpus

    before = embedded_corpus("calibration").sha256
    corpus._stdlib_docstrings.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert embedded_corpus("calibration").sha256 == before


@pytest.mark.parametrize("content, suffix, message", [
    (b"", ".txt", "contains no text"),
    (b"caf\xe9 latin-1", ".txt", "not UTF-8"),
    (b'{"body": "no text field"}\n', ".jsonl", "no string field 'text'"),
    (b'{"text": "ok"}\nnot json\n', ".jsonl", ":2: not valid JSON"),
])
def test_bad_calibration_files_raise_one_line(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message) as info:
        load_corpus(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file_and_jsonl_directory(tmp_path):
    with pytest.raises(CalibrationError, match="no such file"):
        load_corpus(tmp_path / "absent.txt")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n', encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    assert load_corpus(tmp_path).texts == ("first", "second")  # name order


def test_a_directory_is_read_with_its_subdirectories_and_nothing_in_it_is_skipped(tmp_path):
    """Files in subdirectories were skipped, an upper-case .JSONL was calibrated on as plain text (its JSON syntax
    too), a broken link was skipped, and a file that cannot be read was a traceback."""
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "b.JSONL").write_text('{"text": "second"}\n', encoding="utf-8")
    (tmp_path / "notes.md").write_text("not data", encoding="utf-8")
    assert load_corpus(tmp_path).texts == ("first", "second")
    assert load_corpus(tmp_path / "shard" / "b.JSONL").texts == ("second",)
    (tmp_path / "shard" / "c.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(CalibrationError, match="c.txt: not a regular file"):
        load_corpus(tmp_path)
    (tmp_path / "shard" / "c.txt").unlink()
    (tmp_path / "shard" / "c.txt").symlink_to("/proc/self/mem")  # a file whose read fails (EIO), for root too
    with pytest.raises(CalibrationError, match="c.txt: cannot read it"):
        load_corpus(tmp_path)


def test_a_byte_order_mark_is_not_calibration_text(tmp_path):
    """A UTF-8 file saved with a BOM (Notepad, Excel's "CSV UTF-8"): a .jsonl was refused as "not valid JSON
    (Unexpected UTF-8 BOM)" and a .txt was calibrated on the BOM as text."""
    records = ['{"text": "first record"}', '{"text": "second record"}']
    (tmp_path / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(records).encode())
    (tmp_path / "data.txt").write_bytes(b"\xef\xbb\xbfplain prose")
    assert load_corpus(tmp_path / "data.jsonl").texts == tuple(json.loads(r)["text"] for r in records)
    assert load_corpus(tmp_path / "data.txt").texts == ("plain prose",)


def test_too_few_tokens_says_how_many_are_needed():
    with pytest.raises(CalibrationError, match="30 tokens, fewer than one sample of --calib-seq-len 64; give at least 64"):
        cut_samples(np.arange(30), 4, 64, "small.txt")
    windows = cut_samples(np.arange(1000), 4, 100, "x")
    assert windows.shape == (4, 100) and windows[0, 0] == 0 and windows[-1, -1] == 999


@pytest.mark.parametrize("precision, options, message", [
    ("int4", QuantOptions(block_size=48), "--block-size 48 is not supported for int4"),
    ("fp8", QuantOptions(block_size=64), "applies to --precision int4 only"),
    ("int4", QuantOptions(int4_algo="gptq"), "--int4-algo 'gptq' is unknown"),
    ("fp8", QuantOptions(amax_percentile=30.0), "give a percentile in \\(50, 100\\]"),
    ("int4", QuantOptions(amax_percentile=99.9), "int4 is weight-only"),
])
def test_unsupported_combinations(precision, options, message):
    with pytest.raises(CalibrationError, match=message):
        options.check(precision)


def test_cli_bad_calibration_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--precision", "int4", "--calib-data", str(bad),
                                             "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not UTF-8" in lines[0] and "bad.txt" in lines[0]
    assert not (tmp_path / "out").exists()


def test_statistics_match_a_direct_computation_and_cache_is_deterministic(tmp_path):
    model = from_preset("scout-tiny", seed=0, dtype=torch.float32).eval()
    tokenizer_text = embedded_corpus("calibration")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16))
    stats = layerwise_statistics(RandomWeights("scout-tiny", seed=0), ids)
    # layer 0's q/k/v input is input_layernorm(embeddings): computed here without hooks
    x = model.model.embed_tokens(torch.from_numpy(ids)).reshape(-1, model.config.hidden_size).double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * model.model.layers[0].input_layernorm.weight.double()
    np.testing.assert_allclose(stats["layers.0.attn_in.gram"], (normed.T @ normed / len(normed)).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["layers.0.attn_in.mean_abs"], normed.abs().mean(0).numpy(), rtol=1e-4)
    assert float(stats["layers.0.attn_in.amax"]) == pytest.approx(float(normed.abs().max()), rel=1e-5)
    # routed-expert token counts add up to all tokens
    assert stats["layers.0.expert_in.tokens"].sum() == ids.size
    # percentiles of |x| from the histogram: within one bin (2^(1/32)) above numpy's exact value, capped at the amax
    values = normed.abs().flatten().numpy()
    assert stats["layers.0.attn_in.abs_hist"].sum() == values.size
    for q in (50.0, 90.0, 99.0, 99.9):
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        assert exact <= percentile_abs(stats, "layers.0.attn_in", q) <= exact * 2 ** (1 / 32) * (1 + 1e-6), q
    assert percentile_abs(stats, "layers.0.attn_in", 100.0) == pytest.approx(float(values.max()), rel=1e-5)

    key = cache_key({"preset": "scout-tiny", "seed": 0}, tokenizer_text.sha256, ids)
    small = layerwise_statistics(RandomWeights("scout-tiny", seed=0), ids, for_awq=False)  # what the cache holds
    save_cache(tmp_path / "a.safetensors", small, key, {"samples": 2})
    save_cache(tmp_path / "b.safetensors", layerwise_statistics(RandomWeights("scout-tiny", seed=0), ids, for_awq=False),
               key, {"samples": 2})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert load_cache(tmp_path / "a.safetensors", key)["layers.0.attn_in.amax"] == small["layers.0.attn_in.amax"]
    assert load_cache(tmp_path / "a.safetensors", cache_key({"preset": "other"}, "x", ids)) is None


# One process, two torch thread counts: torch's MKL GEMM splits a small matrix product (a routed expert's few tokens)
# differently by thread count, which changed calibration statistics and the report's reference in the last bits.
SAME_BITS_AT_ANY_THREAD_COUNT = """
import sys
import numpy as np, torch
from llama4_export.pipeline import pin_cpu_numerics
assert pin_cpu_numerics() is None
from llama4_export.calib.layerwise import layerwise_statistics
from llama4_export.evaluation.report import ReferenceLogits
from llama4_export.weights import RandomWeights
source = RandomWeights("scout-tiny", seed=0)
ids = np.random.default_rng(0).integers(0, source.config.vocab_size, (4, 128))
runs = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    stats = {name: np.asarray(value) for name, value in layerwise_statistics(source, ids).items()}
    runs.append({**stats, "reference logits": ReferenceLogits(source)(ids)})
print(sorted(name for name in runs[0] if not np.array_equal(runs[0][name], runs[1][name])))
"""


def test_calibration_statistics_and_the_reference_are_the_same_bits_at_any_thread_count():
    env = {k: v for k, v in os.environ.items() if k not in REPRODUCIBLE_CPU_NUMERICS}  # the package's own settings
    run = subprocess.run([sys.executable, "-c", SAME_BITS_AT_ANY_THREAD_COUNT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", f"differ between 1 and 2 threads: {run.stdout}"


def test_an_export_after_torch_ran_kernels_says_its_bits_are_this_machines():
    script = ("import torch; capability = torch.backends.cpu.get_cpu_capability(); torch.ones(4) * 2\n"
              "from llama4_export.pipeline import pin_cpu_numerics; print(capability, '|', pin_cpu_numerics())")
    env = {k: v for k, v in os.environ.items() if k not in REPRODUCIBLE_CPU_NUMERICS}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    capability, _, message = run.stdout.strip().partition(" | ")
    if not capability.startswith("AVX512"):  # what the pin chooses anyway, or a CPU it does not apply to
        assert message == "None", run.stdout + run.stderr
    else:
        assert f"(at {capability}, not AVX2)" in message and "fresh process" in message, run.stdout + run.stderr


def test_a_damaged_file_in_the_default_cache_is_recomputed_and_one_given_is_refused(tmp_path, monkeypatch):
    """The default cache is ours: a damaged file there (a full disk, a killed writer of an older version) stopped every
    export of that model with "delete it" until the user found the file. A --calib-cache FILE stays the user's."""
    from llama4_export.calib import calibrate as calibrate_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source, text = RandomWeights("scout-tiny", seed=0, layers=2), embedded_corpus("calibration")
    ids = np.random.default_rng(0).integers(0, source.config.vocab_size, (2, 16))
    first = calibrate_module.calibrate(source, ids, text, None)
    assert first.cache_path.is_relative_to(tmp_path / "cache")
    good = first.cache_path.read_bytes()
    first.cache_path.write_bytes(b"damaged")
    again = calibrate_module.calibrate(source, ids, text, None)
    assert not again.reused and again.cache_path.read_bytes() == good
    given = tmp_path / "mine.safetensors"
    given.write_bytes(b"damaged")
    with pytest.raises(CalibrationError, match="mine.safetensors: not a readable calibration cache"):
        calibrate_module.calibrate(source, ids, text, given)
    # a safetensors file that is no calibration cache (a checkpoint shard) was taken for another model's cache and
    # overwritten with the statistics
    from safetensors.numpy import save_file

    save_file({"model.norm.weight": np.ones(8, np.float32)}, given)
    weights = given.read_bytes()
    with pytest.raises(CalibrationError, match="mine.safetensors: a safetensors file but no calibration cache"):
        calibrate_module.calibrate(source, ids, text, given)
    assert given.read_bytes() == weights
    # the AWQ plans beside our cache file, likewise (a truncated one stopped the export with "delete it")
    planned = calibrate_module.calibrate(source, ids, text, None, awq_block=32)
    plan = sorted(planned.awq_plans.iterdir())[1]
    kept = plan.read_bytes()
    plan.write_bytes(kept[:len(kept) // 2])
    replanned = calibrate_module.calibrate(source, ids, text, None, awq_block=32)
    assert replanned.awq_records == planned.awq_records and plan.read_bytes() == kept


def test_the_cache_is_not_reused_for_other_token_ids_of_the_same_text(tmp_path):
    """The key held the text's hash and the sample shape, not the ids: after a checkpoint's tokenizer.json changed
    (not among the files its identity hashes), the same text gave other samples and the stale statistics (and AWQ
    plans) of the old ones were reused."""
    from llama4_export.calib import calibrate as calibrate_module

    source, text = RandomWeights("scout-tiny", seed=0, layers=1), embedded_corpus("calibration")
    old, new = (np.random.default_rng(seed).integers(0, source.config.vocab_size, (2, 16)) for seed in (0, 1))
    cache = tmp_path / "calib.safetensors"
    calibrate_module.calibrate(source, old, text, cache, awq_block=32)
    again = calibrate_module.calibrate(source, new, text, cache, awq_block=32)
    fresh = layerwise_statistics(source, new, for_awq=False)
    assert not again.reused
    for name in fresh:
        np.testing.assert_array_equal(np.asarray(again.stats[name]).reshape(fresh[name].shape), fresh[name], err_msg=name)


def test_checkpoint_without_tokenizer_needs_one_for_calibration_but_not_for_rtn_or_the_report(tmp_path):
    """A random transformers checkpoint (vocab 128, bos 1: no room for a byte-level tokenizer) and no tokenizer.json."""
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    from .conftest import make_hf_checkpoint

    checkpoint = make_hf_checkpoint(tmp_path / "ckpt")
    base = ["--checkpoint", str(checkpoint), "--precision", "int4", "--block-size", "32"]
    result = CliRunner().invoke(export_app, [*base, "--out", str(tmp_path / "awq")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "no tokenizer.json" in lines[0] and "--int4-algo rtn" in lines[0]
    assert not (tmp_path / "awq").exists()
    result = CliRunner().invoke(export_app, [*base, "--int4-algo", "rtn", "--out", str(tmp_path / "rtn")])
    assert result.exit_code == 0, result.output
    # stderr is no terminal here (as in a CI log): every step is a line when it starts and one with its time at its end
    steps = [line for line in result.stderr.splitlines() if line.startswith(("▸ ", "✓ "))]
    assert steps[:2] == ["▸ trace decode + prefill (4 layers, weights on the meta device)",
                         steps[1]] and re.fullmatch(r"✓ trace decode \+ prefill .* \(\d+\.\d s\)", steps[1])
    assert len(steps) % 2 == 0 and steps[-1].startswith("✓ accuracy report")
    report = json.loads((tmp_path / "rtn" / "report.json").read_text())  # evaluated on random ids: no tokenizer
    assert report["eval_data"] == "random token ids (no tokenizer)" and report["top1_agreement"] > 0.5
    # held-out text asked for: the refusal was calibration's, advising --int4-algo rtn (already given)
    (tmp_path / "heldout.txt").write_text("some held-out text " * 50)
    result = CliRunner().invoke(export_app, [*base, "--int4-algo", "rtn", "--eval-data", str(tmp_path / "heldout.txt"),
                                             "--out", str(tmp_path / "text")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].endswith(f"the accuracy report tokenizes --eval-data {tmp_path / 'heldout.txt'}; add the "
                             "checkpoint's tokenizer.json, or leave --eval-data out (the report then runs on seeded "
                             "random token ids)"), lines[0]


def test_exports_sharing_a_calibration_cache_at_once_do_not_trip_over_each_other(tmp_path, monkeypatch):
    """Two exports of the same inputs may calibrate at once into one cache (the default cache is per user). Saving
    the statistics used one fixed temp name, so two writers wrote one file together and the second rename failed;
    installing AWQ plans removed the plans another export had just installed (and may be reading)."""
    import os
    import subprocess
    import sys

    from llama4_export.calib import calibrate as calibrate_module

    path = tmp_path / "stats.safetensors"
    saver = ("import sys, numpy as np\nfrom llama4_export.calib.stats import save_cache\n"
             "x = np.arange(4_000_000, dtype=np.float32)\nfor _ in range(60): save_cache(sys.argv[1], {'x': x}, 'key', {})")
    savers = [subprocess.Popen([sys.executable, "-c", saver, str(path)], stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    failures = [stderr for process in savers if (stderr := process.communicate(timeout=300)[1]) and process.returncode]
    assert failures == [] and np.array_equal(load_cache(path, "key")["x"], np.arange(4_000_000, dtype=np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]  # no temp file left

    source, text = RandomWeights("scout-tiny", seed=0), embedded_corpus("calibration")
    ids = np.random.default_rng(0).integers(0, source.config.vocab_size, (2, 16))
    cache = tmp_path / "calib.safetensors"
    first = calibrate_module.calibrate(source, ids, text, cache, awq_block=32)
    installed = os.stat(first.awq_plans).st_ino
    found, calls = calibrate_module.cached_plans, []

    def absent_at_first_look(*args):  # the second export looked before the first had installed its plans
        calls.append(args)
        return None if len(calls) == 1 else found(*args)

    monkeypatch.setattr(calibrate_module, "cached_plans", absent_at_first_look)
    second = calibrate_module.calibrate(source, ids, text, cache, awq_block=32)
    assert len(calls) == 2 and second.awq_plans == first.awq_plans
    assert os.stat(second.awq_plans).st_ino == installed  # the installed plans were kept, not removed and replaced
    assert found(second.awq_plans, source.config.num_hidden_layers, first.key) == first.awq_records
    assert second.awq_records == first.awq_records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.awq32", "calib.safetensors", "stats.safetensors"]


@pytest.mark.parametrize("flags, message", [
    (["--eval-data", "{text}", "--no-report"], "--eval-data is what the accuracy report evaluates on, and --no-report "
                                               "skips it: drop one"),
    (["--precision", "int4", "--float-embeddings", "--quantize-lm-head"],
     "--float-embeddings keeps the embedding and lm_head in float, --quantize-lm-head quantizes lm_head: choose one"),
    # found after the whole calibration, as an IsADirectoryError traceback (and a stray "DIR.awq128/" beside it)
    (["--precision", "int4", "--calib-cache", "{dir}"], "--calib-cache {dir}: is a directory; give the cache file's "
                                                        "path, e.g. {dir}/calib.safetensors"),
    # the next four: a traceback at the end of the export, block 128 silently, and two flags silently ignored
    (["--eval-data", "{short}"], "--eval-data {short}: 1 token(s), and the report predicts each next token of windows "
                                 "of the text: give at least 16 tokens of text"),
    (["--precision", "int4", "--block-size", "0"], "--block-size 0 is not supported for int4; choose one of: 32, 64, 128"),
    (["--precision", "fp8", "--float-embeddings"], "--float-embeddings applies to --precision int4 (fp8 keeps the token "
                                                   "embedding and lm_head in float already); drop it"),
    (["--precision", "fp8", "--calib-cache", "{text}/calib.safetensors"],
     "--calib-cache {text}/calib.safetensors: cannot write there (File exists: {text}); give a writable path"),
    # calibrated on positions past scout-tiny's max_position_embeddings
    (["--precision", "fp8", "--calib-samples", "1", "--calib-seq-len", "4097"],
     "--calib-seq-len 4097: longer than the model's context of 4096 tokens (max_position_embeddings); choose at most "
     "4096"),
], ids=["eval-data-no-report", "float-and-quantized-lm-head", "cache-dir", "eval-data-too-short", "block-size-0",
        "float-embeddings-fp8", "cache-not-writable", "seq-len-past-context"])
def test_contradicting_flags_are_refused_in_one_line(tmp_path, flags, message):
    """Each was silently ignored, one side of the contradiction winning (or, for the cache, failed at the end of the
    calibration), while inapplicable flags such as --int4-algo with fp32 were refused."""
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    (tmp_path / "text.txt").write_text("Some calibration text.\n")
    (tmp_path / "short.txt").write_text("a")
    (tmp_path / "dir").mkdir()
    paths = {"text": str(tmp_path / "text.txt"), "dir": str(tmp_path / "dir"), "short": str(tmp_path / "short.txt")}
    result = CliRunner().invoke(export_app, ["--model", "scout-tiny", *[f.format(**paths) for f in flags],
                                             "--out", str(tmp_path / "out")], terminal_width=400)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines == [f"error: {message.format(**paths)}"], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "short.txt", "text.txt"]


def test_calibration_settings_where_nothing_calibrates_are_noted(tmp_path):
    """`-p fp16 --calib-data X` / `-p int4 --int4-algo rtn --calib-samples 4` ignored them without a word; a script
    passing one set of calibration settings to every precision keeps working, and is told."""
    from typer.testing import CliRunner

    from llama4_export.cli.export import export_app

    (tmp_path / "text.txt").write_text("Some calibration text.\n")
    for flags, note in (
            (["--precision", "fp16", "--calib-data", str(tmp_path / "text.txt")],
             "--calib-data: not used, --precision fp16 calibrates nothing"),
            (["--precision", "int4", "--int4-algo", "rtn", "--calib-samples", "4", "--calib-seq-len", "8",
              "--calib-cache", str(tmp_path / "c.safetensors")],  # the cache was left off the note
             "--calib-samples / --calib-seq-len / --calib-cache: not used, --precision int4 --int4-algo rtn calibrates "
             "nothing")):
        result = CliRunner().invoke(export_app, ["--model", "scout-tiny", "--layers", "1", "--random-weights",
                                                 "--no-report", *flags, "--out", str(tmp_path / "o")],
                                    terminal_width=400)
        assert result.exit_code == 0, result.output
        assert f"{note} (int4 with AWQ, fp8 and --kv-cache-dtype fp8 do)" in result.stderr.splitlines(), result.stderr


def test_rebuild_refuses_other_calibration_text_before_calibrating(tmp_path, monkeypatch):
    """rebuild --calib-data with a file other than the one the artifact was calibrated on calibrated in full (hours
    at Scout's size) before the hashes differed; the text's sha256 is in the manifest and is checked first."""
    from llama4_export import api, pipeline
    from llama4_export.tensorrt.errors import BuildError

    words = " ".join(f"word{i % 97} of the calibration text" for i in range(600))
    (tmp_path / "calib.txt").write_text(words)
    (tmp_path / "other.txt").write_text(words.replace("word1 ", "word2 "))
    out = tmp_path / "awq"
    api.export_model(out, model="scout-tiny", layers=1, random_weights=True, precision="int4", show_progress=False,
                     quant=api.QuantOptions(calib_data=tmp_path / "calib.txt", calib_samples=2, calib_seq_len=16,
                                            calib_cache=tmp_path / "calib.safetensors", report=False))
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibrated before refusing"))
    with pytest.raises(BuildError, match=r"^--calib-data .*other.txt: its text \(sha256 [0-9a-f]{16}…\) is not what the "
                                         r"artifact was calibrated on \('.*calib.txt', sha256 [0-9a-f]{16}…\); pass that file"):
        api.rebuild(out, calib_data=tmp_path / "other.txt", show_progress=False)


def test_an_export_with_its_own_held_out_text_records_its_name_and_rebuilds_with_it(tmp_path):
    """report.json held the --eval-data path as given (an absolute path in an artifact, so the same file elsewhere made
    other bytes), and `rebuild` had no --eval-data: it rebuilt the report on the embedded corpus and said "not
    reproducible". The report now names the file and its text's sha256; the rebuild asks for it and checks it."""
    from llama4_export import api
    from llama4_export.tensorrt.errors import BuildError

    words = " ".join(f"held out sentence {i % 89} of the evaluation text." for i in range(700))
    (tmp_path / "heldout.txt").write_text(words)
    (tmp_path / "other.txt").write_text(words.replace("sentence 1 ", "sentence 2 "))
    out = tmp_path / "tiny"
    api.export_model(out, model="scout-tiny", layers=1, random_weights=True, show_progress=False,
                     quant=api.QuantOptions(eval_data=tmp_path / "heldout.txt"))
    report = json.loads((out / "report.json").read_text())
    assert report["eval_data"] == "heldout.txt" and str(tmp_path) not in (out / "report.json").read_text()
    assert report["eval_data_sha256"] == load_corpus(tmp_path / "heldout.txt", "heldout").sha256
    with pytest.raises(BuildError, match=r"^the accuracy report was made on 'heldout.txt' \(sha256 [0-9a-f]{16}…\); "
                                         r"pass it again with --eval-data$"):
        api.rebuild(out, show_progress=False)
    with pytest.raises(BuildError, match=r"^--eval-data .*other.txt: its text \(sha256 [0-9a-f]{16}…\) is not what"):
        api.rebuild(out, eval_data=tmp_path / "other.txt", show_progress=False)
    with pytest.raises(BuildError, match=r"^--calib-data .*heldout.txt: the artifact was not calibrated"):
        api.rebuild(out, calib_data=tmp_path / "heldout.txt", eval_data=tmp_path / "heldout.txt", show_progress=False)
    result = api.rebuild(out, eval_data=tmp_path / "heldout.txt", show_progress=False)
    assert result.identical, result.differences

