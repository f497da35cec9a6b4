"""`pyjamba generate` and `pyjamba chat` end to end, and the text layer under them, on a tiny model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyjamba.pipeline import _split_at_stop
from pyjamba.runtime import load
from pyjamba.testing import tiny_model_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Jamba with a real byte-level BPE tokenizer and a chat template."""
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-jamba"))


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyjamba", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_greedy_matches_the_python_api(model_dir):
    result = _cli(
        "generate", "It is a truth", "--model", str(model_dir), "--max-new-tokens", "12", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    expected = load(model_dir).complete("It is a truth", max_new_tokens=12, do_sample=False)
    assert result.stdout == "It is a truth" + expected + "\n"


def test_generate_reads_the_prompt_from_stdin_and_seeds_sampling(model_dir):
    args = ("generate", "--model", str(model_dir), "--max-new-tokens", "10", "--seed", "7")
    first, second = _cli(*args, stdin="Once upon"), _cli(*args, stdin="Once upon")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Once upon")
    assert first.stdout == second.stdout


def test_chat_reset_and_exit(model_dir):
    script = "hello there\n/reset\nhow are you\n/exit\n"
    result = _cli(
        "chat", "--model", str(model_dir), "--max-new-tokens", "6", "--temperature", "0", stdin=script
    )
    assert result.returncode == 0, result.stderr
    assert "(conversation reset)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "hi", "--model", "/nonexistent/model"), "no model folder at /nonexistent/model"),
        (("generate", "hi", "--model", "{model}/tokenizer.json"), "no model folder at"),
        (("generate", "hi", "--model", "{empty}"), "no config.json"),
        (("generate", "hi", "--model", "{model}", "--temperature", "-1"), "temperature"),
        (("generate", "hi", "--model", "{model}", "--top-p", "1.5"), "top_p"),
        (("generate", "hi", "--model", "{model}", "--threads", "0"), "--threads must be at least 1"),
    ],
)
def test_errors_are_one_clear_line(model_dir, tmp_path, args, message):
    result = _cli(*(a.format(model=model_dir, empty=tmp_path) for a in args))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_strings_end_the_text(model_dir):
    generator = load(model_dir)
    full = generator.complete("It is", max_new_tokens=20, do_sample=False)
    assert len(full) > 4
    stop = full[2:4]
    cut = generator.complete("It is", max_new_tokens=20, do_sample=False, stop_strings=[stop])
    assert cut == full[: full.find(stop)]


@pytest.mark.parametrize(
    ("text", "stop", "final", "expected"),
    [
        ("hello world", ["###"], False, ("hello world", "", False)),
        ("hello #", ["###"], False, ("hello ", "#", False)),
        ("hello ##", ["###"], False, ("hello ", "##", False)),
        ("hello ###", ["###"], False, ("hello ", "", True)),
        ("a###b", ["###", "b"], False, ("a", "", True)),
        ("hello ##", ["###"], True, ("hello ##", "", False)),
        ("abc", [], False, ("abc", "", False)),
        ("xEN", ["END", "ENOUGH"], False, ("x", "EN", False)),
    ],
)
def test_split_at_stop(text, stop, final, expected):
    assert _split_at_stop(text, stop, final=final) == expected
