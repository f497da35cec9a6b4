"""Data: the Austen cleaner, the BPE tokenizer (deterministic, equal to transformers' AutoTokenizer),
tokenized corpora (document boundaries, a split with no document on both sides, dtypes) and the
batch iterators (shifted labels, consecutive state-passing streams, exact resume).

A small synthetic corpus and a 400-id tokenizer keep the file fast; the real Austen text is used
only by the slow test that regenerates data/austen.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyjamba.__main__ import main as pyjamba_main
from pyjamba.data import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    DataError,
    RandomWindows,
    StatefulChunks,
    TokenDataset,
    clean_austen,
    clean_novel,
    eval_batches,
    split_documents,
    token_dtype,
    tokenize_corpus,
    tokenizer_hash,
    train_tokenizer,
)
from pyjamba.data.cli import main as data_main
from pyjamba.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_AUSTEN = REPO.parent / "shared" / "data" / "austen"

VOCABULARY = (
    "the of and to a her was in it she not be that he his had as for you with but my have which all "
    "Elinor Marianne Emma Harriet Darcy Elizabeth Bingley Catherine Anne Wentworth Fanny Edmund "
    "letter morning evening ball walk house garden sister mother brother father friend marriage "
    'fortune happiness opinion attention, manner. spirits; feelings! Hartfield? "Indeed," --said '
    "café £5"
)
WORDS = VOCABULARY.split()


def _document(rng: random.Random, i: int) -> str:
    paragraphs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 40))) for _ in range(rng.randrange(1, 5))
    ]
    return "\n".join([f"Chapter {i}", *paragraphs])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """Three files of blank-line-separated documents, and every document in reading order."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    documents = []
    for name, n in (("a.txt", 9), ("b.txt", 14), ("c.txt", 7)):
        docs = [_document(rng, i + 1) for i in range(n)]
        (folder / name).write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        documents += docs
    return folder, documents


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    return train_tokenizer([corpus[0]], 400, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tokens_dir(corpus, tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "out"
    tokenize_corpus([corpus[0]], tok_dir, out, val_fraction=0.2, seed=3, progress=False)
    return out


# ---- the cleaner ------------------------------------------------------------------------------

RAW_NOVEL = """\
A TITLE

By Jane Austen

(1811)




VOLUME I



CHAPTER I


It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a _wife_.  However little known
the feelings of such a man may be--

\u201cSo it is,\u201d said she; \u2018indeed\u2019 she said it.--
"Yes," he replied, "quite."

    My first doth affliction denote,
      Which my second is destin'd to feel

     "I have just had the honour of receiving your
     letter, for which I beg to return my sincere
     acknowledgments.

          "Yours ever,
                    "A. W."

                       [To Mrs. Weston.]

                          * * * * *

A celebrated writer holds that no lady may love before the gentleman's love is declared,* it
must be improper.

                        [End volume one of this edition.
                        Printed by T. and A. Constable]



CHAPTER II


Short.

VOLUME II

CHAPTER I

Last one.



THE END

*Vide a letter from Mr. Richardson.




A NOTE ON THE TEXT

An editor wrote this.
"""

CLEAN_NOVEL = """\
Volume 1
Chapter 1
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. However little known the feelings of such a man may be--
"So it is," said she; 'indeed' she said it.--"Yes," he replied, "quite."
My first doth affliction denote,
Which my second is destin'd to feel
"I have just had the honour of receiving your letter, for which I beg to return my sincere acknowledgments.
"Yours ever,
"A. W."
[To Mrs. Weston.]
* * *
A celebrated writer holds that no lady may love before the gentleman's love is declared,* it must be improper.
*Vide a letter from Mr. Richardson.

Chapter 2
Short.

Volume 2
Chapter 1
Last one.
"""


def test_clean_novel_format():
    novel = clean_novel(RAW_NOVEL)
    assert novel.text == CLEAN_NOVEL
    assert (novel.documents, novel.chapters) == (3, 3)
    assert split_documents(novel.text)[1] == "Chapter 2\nShort."


def test_clean_novel_keeps_a_preface_and_reads_arabic_headings():
    raw = (
        "TITLE\n\nADVERTISEMENT BY THE AUTHORESS, TO THE BOOK\n\nTHIS little\nwork.\n\nCHAPTER 12\n\nText.\n"
    )
    assert (
        clean_novel(raw).text
        == "Advertisement by the Authoress, to the Book\nTHIS little work.\n\nChapter 12\nText.\n"
    )
    with pytest.raises(DataError, match="no chapter headings"):
        clean_novel("Just some text.\n\nMore text.\n")


def test_clean_austen_writes_novels_and_licence(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "novel.txt").write_text(RAW_NOVEL, encoding="utf-8")
    with pytest.raises(DataError, match=r"COPYRIGHT\.debian"):
        clean_austen(src, out)
    (src / "COPYRIGHT.debian").write_text("License: MIT\n", encoding="utf-8")
    out.mkdir()
    (out / "README.md").write_text("kept\n")
    report = clean_austen(src, out)
    assert (out / "novel.txt").read_text(encoding="utf-8") == CLEAN_NOVEL
    assert (out / "COPYRIGHT.debian").read_text() == "License: MIT\n"
    assert (out / "README.md").read_text() == "kept\n"  # other files are left alone
    assert report["novel.txt"]["documents"] == 3 and len(report["novel.txt"]["raw_sha256"]) == 64
    assert sorted(p.name for p in out.iterdir()) == ["COPYRIGHT.debian", "README.md", "novel.txt"]
    (src / "bad.txt").write_text("no chapters here\n")
    with pytest.raises(DataError, match=r"bad\.txt: no chapter headings"):
        clean_austen(src, out)


@pytest.mark.slow
def test_cleaned_austen_in_the_repo_regenerates(tmp_path):
    """data/austen is exactly what `pyjamba data clean-austen` makes of the shared raw text."""
    if not SHARED_AUSTEN.is_dir():
        pytest.skip(f"{SHARED_AUSTEN} not present")
    report = clean_austen(SHARED_AUSTEN, tmp_path)
    for name in report:
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "austen" / name).read_bytes(), name
    chapters = {name: r["chapters"] for name, r in report.items()}
    assert chapters == {
        "emma.txt": 55,
        "mansfieldpark.txt": 48,
        "northangerabbey.txt": 31,
        "persuasion.txt": 24,
        "prideprejudice.txt": 61,
        "sensesensibility.txt": 50,
    }
    text = "".join((tmp_path / name).read_text() for name in report)
    assert "_" not in text and "NOTE ON THE TEXT" not in text and "edition." not in text
    assert "\u201c" not in text and "  " not in text


# ---- the tokenizer ----------------------------------------------------------------------------


def test_tokenizer_folder(tok_dir):
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    assert config["add_bos_token"] is True and config["model_max_length"] == 2048
    tok = Tokenizer.from_pretrained(tok_dir)
    assert tok.vocab_size == 400
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("Emma")[0] == tok.bos_token_id
    assert tok.decode(tok.encode("Hartfield, café £5\n\nnew")) == "Hartfield, café £5\n\nnew"


def test_tokenizer_is_deterministic(corpus, tok_dir, tmp_path):
    again = train_tokenizer(sorted(corpus[0].glob("*.txt")), 400, tmp_path / "again")
    code = (
        "import sys; from pyjamba.data.bpe import train_tokenizer; "
        "train_tokenizer([sys.argv[1]], 400, sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(corpus[0]), str(tmp_path / "other")], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes()
        assert (tmp_path / "other" / name).read_bytes() == (tok_dir / name).read_bytes()
    assert tokenizer_hash(again) == tokenizer_hash(tok_dir)


def test_tokenizer_is_written_atomically_and_checks_its_input(corpus, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train_tokenizer([corpus[0]], 300, out)
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary folders left behind
    with pytest.raises(DataError, match="at least 261"):
        train_tokenizer([corpus[0]], 260, tmp_path / "small")
    with pytest.raises(DataError, match="no such file"):
        train_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "x")
    assert not (tmp_path / "small").exists() and not (tmp_path / "x").exists()


TEXTS = [
    "Emma Woodhouse, handsome, clever, and rich",
    '  "Indeed," said she--\n\nChapter 3\n',
    "café £5 naïve 日本 🙂",
    "special <|im_start|>user\nhi<|im_end|> tokens <|eos|>",
]


def test_tokenizer_equals_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ours = Tokenizer.from_pretrained(tok_dir)
    assert len(theirs) == ours.vocab_size
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 0)
    assert {"<|im_start|>", "<|im_end|>"} <= set(theirs.all_special_tokens)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(
                text, add_special_tokens=special
            )
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is Emma?"},
        {"role": "assistant", "content": "A young lady of Highbury."},
    ]
    for prompt in (True, False):
        text = ours.apply_chat_template(chat, add_generation_prompt=prompt)
        assert text == theirs.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
        assert ours.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True) == list(
            theirs.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True, return_dict=False)
        )
    assert text.startswith("<|bos|><|im_start|>system\nBe brief.<|im_end|>\n")


# ---- tokenized corpora ------------------------------------------------------------------------


def test_split_documents():
    text = "a\nb\n\n\nc\n \nd\n"
    assert split_documents(text, "blank") == ["a\nb", "c", "d"]
    assert split_documents(text, "line") == ["a", "b", "c", "d"]
    assert split_documents(text, "file") == ["a\nb\n\n\nc\n \nd"]
    with pytest.raises(DataError, match="doc_split"):
        split_documents(text, "page")


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_tokenized_documents_and_split(corpus, tok_dir, tokens_dir):
    documents = corpus[1]
    tok = Tokenizer.from_pretrained(tok_dir)
    meta = json.loads((tokens_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    assert meta["tokenizer"]["sha256"] == tokenizer_hash(tok_dir)
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "b.txt", "c.txt"]
    assert meta["sources"][0]["sha256"] == hashlib.sha256((corpus[0] / "a.txt").read_bytes()).hexdigest()
    decoded = {}
    for split in ("train", "val"):
        data = TokenDataset(tokens_dir, split)
        assert isinstance(data.tokens, np.memmap) and data.tokens.dtype == np.uint16
        assert (
            len(data) == meta["splits"][split]["tokens"] == (tokens_dir / f"{split}.bin").stat().st_size // 2
        )
        assert data.doc_starts[0] == 0 and np.all(np.diff(data.doc_starts) > 0)
        texts = []
        for i in range(data.num_documents):
            doc = data.document(i)
            assert doc[0] == tok.bos_token_id and doc[-1] == tok.eos_token_id
            assert tok.eos_token_id not in doc[:-1] and tok.bos_token_id not in doc[1:]
            texts.append(tok.decode(doc))
        decoded[split] = texts
    assert len(decoded["val"]) == round(0.2 * len(documents)) == 6
    assert not set(decoded["train"]) & set(decoded["val"])  # no document on both sides
    assert sorted(decoded["train"] + decoded["val"]) == sorted(documents)
    # Within a split the documents keep their reading order.
    assert decoded["train"] == [d for d in documents if d in decoded["train"]]
    val_by_source = [(Path(s["path"]).name, s["val_documents"]) for s in meta["sources"]]
    recorded = [split_documents((corpus[0] / n).read_text())[d] for n, ds in val_by_source for d in ds]
    assert recorded == decoded["val"]


def test_split_is_seeded_and_follows_the_text(corpus, tok_dir, tokens_dir, tmp_path):
    files = sorted(corpus[0].glob("*.txt"))
    same = tokenize_corpus(files[::-1], tok_dir, tmp_path / "same", val_fraction=0.2, seed=3, progress=False)
    val = TokenDataset(tokens_dir, "val")
    reordered = TokenDataset(tmp_path / "same", "val")
    assert sorted(map(bytes, map(val.document, range(val.num_documents)))) == sorted(
        map(bytes, map(reordered.document, range(reordered.num_documents)))
    )
    tokenize_corpus([corpus[0]], tok_dir, tmp_path / "again", val_fraction=0.2, seed=3, progress=False)
    for name in ("train.bin", "val.bin", "train.docs.npy", "val.docs.npy"):
        assert (tmp_path / "again" / name).read_bytes() == (tokens_dir / name).read_bytes()
    other = tokenize_corpus(
        [corpus[0]], tok_dir, tmp_path / "other", val_fraction=0.2, seed=4, progress=False
    )
    assert [s["val_documents"] for s in other["sources"]] != [
        s["val_documents"] for s in json.loads((tokens_dir / "meta.json").read_text())["sources"]
    ]
    assert same["splits"]["val"]["documents"] == 6
    none = tokenize_corpus([corpus[0]], tok_dir, tmp_path / "none", val_fraction=0, progress=False)
    assert none["splits"]["val"] == {"tokens": 0, "documents": 0}
    assert len(TokenDataset(tmp_path / "none", "val")) == 0


def test_tokenize_errors(corpus, tok_dir, tmp_path):
    with pytest.raises(DataError, match="none would be left"):
        tokenize_corpus([corpus[0] / "a.txt"], tok_dir, tmp_path / "o", doc_split="file", progress=False)
    with pytest.raises(DataError, match="no such file"):
        tokenize_corpus([tmp_path / "nope"], tok_dir, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="tokenizer"):
        tokenize_corpus([corpus[0]], tmp_path / "no-tok", tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="val_fraction"):
        tokenize_corpus([corpus[0]], tok_dir, tmp_path / "o", val_fraction=1.0, progress=False)
    assert not (tmp_path / "o").exists()


def test_token_dataset_reads_uint32_and_checks_sizes(tmp_path, tokens_dir):
    meta = json.loads((tokens_dir / "meta.json").read_text())
    meta.update(dtype="uint32", vocab_size=70000)
    meta["splits"] = {"train": {"tokens": 5, "documents": 2}, "val": {"tokens": 0, "documents": 0}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.array([1, 69999, 2, 1, 2], dtype=np.uint32).tofile(tmp_path / "train.bin")
    np.save(tmp_path / "train.docs.npy", np.array([0, 3], dtype=np.int64))
    data = TokenDataset(tmp_path, "train")
    assert data.tokens.dtype == np.uint32 and data.document(0).tolist() == [1, 69999, 2]
    assert data.document(1).tolist() == [1, 2]
    with pytest.raises(DataError, match=r"val\.bin"):
        TokenDataset(tmp_path, "val")
    np.array([1, 2], dtype=np.uint32).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match=r"train\.bin"):
        TokenDataset(tmp_path, "train")
    with pytest.raises(DataError, match=r"meta\.json"):
        TokenDataset(tmp_path / "empty", "train")


# ---- batch iterators --------------------------------------------------------------------------


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)


def test_random_windows(tokens_dir):
    data = TokenDataset(tokens_dir, "train")
    windows = RandomWindows(data, seq_len=16, batch_size=4, seed=1)
    per_epoch = windows.windows_per_epoch()
    slices = np.lib.stride_tricks.sliding_window_view(data.tokens.astype(np.int64), 17)  # (N-16, 17)
    starts = []
    for _ in range(per_epoch // 4):
        inputs, labels = next(windows)
        assert inputs.shape == labels.shape == (4, 16) and inputs.dtype == labels.dtype == torch.int64
        window = torch.cat([inputs, labels[:, -1:]], dim=1).numpy()  # (B, 17)
        assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are the next tokens
        for row in window:  # each window is a slice of the corpus
            starts.append(int(np.flatnonzero((slices == row).all(axis=1))[0]))
    assert len(set(starts)) == len(starts)  # an epoch never repeats a window
    assert len({s % 16 for s in starts}) == 1
    first = RandomWindows(data, 16, 4, seed=1)
    assert not torch.equal(next(first)[0], next(RandomWindows(data, 16, 4, seed=2))[0])
    with pytest.raises(DataError, match="shorter than one window"):
        RandomWindows(data, seq_len=len(data), batch_size=1)


def test_random_windows_resume(tokens_dir):
    data = TokenDataset(tokens_dir, "train")
    per_epoch = RandomWindows(data, 32, 3, seed=5).windows_per_epoch()
    n = 2 * per_epoch // 3 + 2  # runs past an epoch boundary
    straight = _take(RandomWindows(data, 32, 3, seed=5), n)
    for stop in (1, per_epoch // 3, n - 1):
        first = RandomWindows(data, 32, 3, seed=5)
        head = _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = RandomWindows(data, 32, 3, seed=5)
        resumed.load_state_dict(state)
        _equal_batches(head + _take(resumed, n - stop), straight)
    with pytest.raises(ValueError, match="seed"):
        RandomWindows(data, 32, 3, seed=6).load_state_dict(state)


def _streams(chunks, batch_size):
    """Per stream, the documents it walked, each as its input tokens joined in order."""
    walked: list[list[list[int]]] = [[] for _ in range(batch_size)]
    for inputs, labels, reset in chunks:
        for b in range(batch_size):
            real = labels[b] != -100
            assert bool(real[0]) and torch.all(real[: int(real.sum())])  # real positions come first
            if reset[b]:
                walked[b].append([])
            walked[b][-1] += inputs[b][real].tolist()
    return walked


def test_stateful_chunks_are_consecutive(tokens_dir):
    data = TokenDataset(tokens_dir, "train")
    chunks = StatefulChunks(data, seq_len=8, batch_size=3, seed=0)
    batches = _take(chunks, 60)
    assert bool(batches[0][2].all())  # every stream starts with a document
    for (_, y0, _), (x1, _, r1) in itertools.pairwise(batches):
        for b in range(3):
            if not r1[b]:  # a continuing stream picks up exactly where it stopped
                assert x1[b, 0] == y0[b, -1]
                assert (y0[b] != -100).all()
    for inputs, labels, _ in batches:
        real = labels != -100
        assert torch.equal(inputs[:, 1:][real[:, 1:]], labels[:, :-1][real[:, 1:]])
        assert torch.all(inputs[~real] == data.pad_token_id)
    docs = {tuple(data.document(i)[:-1].tolist()) for i in range(data.num_documents)}
    walked = _streams(batches, 3)
    complete = [doc for stream in walked for doc in stream[:-1]]  # the last one may be unfinished
    assert complete and all(tuple(doc) in docs for doc in complete)
    # The first epoch hands out every document once, across the streams.
    order = np.random.default_rng([0, 0]).permutation(data.num_documents)
    firsts = sorted(tuple(stream[0]) for stream in walked)
    assert firsts == sorted(tuple(data.document(i)[:-1].tolist()) for i in order[:3])


def test_stateful_chunks_resume(tokens_dir):
    data = TokenDataset(tokens_dir, "train")
    straight = _take(StatefulChunks(data, 8, 3, seed=2), 150)  # more than one epoch
    assert StatefulChunks(data, 8, 3, seed=2).epoch == 0
    for stop in (1, 37, 149):
        first = StatefulChunks(data, 8, 3, seed=2)
        head = _take(first, stop)
        resumed = StatefulChunks(data, 8, 3, seed=2)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        _equal_batches(head + _take(resumed, 150 - stop), straight)
    assert first.epoch >= 1
    with pytest.raises(ValueError, match="batch_size"):
        StatefulChunks(data, 8, 4, seed=2).load_state_dict(first.state_dict())


def test_eval_batches_cover_the_split_once_in_order(tokens_dir):
    data = TokenDataset(tokens_dir, "val")
    batches = list(eval_batches(data, seq_len=8, batch_size=4))
    assert batches and all(x.shape == y.shape and x.shape[1] == 8 for x, y in batches)
    assert all(x.shape[0] == 4 for x, _ in batches[:-1])
    targets = torch.cat([y[y != -100] for _, y in batches]).tolist()
    expected = [t for i in range(data.num_documents) for t in data.document(i)[1:].tolist()]
    assert targets == expected
    _equal_batches(batches, list(eval_batches(data, 8, 4)))


# ---- command line ------------------------------------------------------------------------------


def test_cli_end_to_end(corpus, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "novel.txt").write_text(RAW_NOVEL, encoding="utf-8")
    (src / "COPYRIGHT.debian").write_text("License: MIT\n")
    assert pyjamba_main(["data", "clean-austen", str(src), str(tmp_path / "clean")]) == 0
    assert (tmp_path / "clean" / "novel.txt").read_text() == CLEAN_NOVEL
    assert (
        data_main(["tokenizer", str(corpus[0]), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    )
    args = ["tokenize", str(corpus[0]), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "t")]
    assert data_main([*args, "--val-fraction", "0.1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 documents" in out and "uint16" in out
    assert TokenDataset(tmp_path / "t", "val").num_documents == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["clean-austen", "missing", "out"], "missing: no such folder"),
        (["tokenizer", "missing.txt", "--vocab-size", "300", "--out", "o"], "missing.txt: no such file"),
        (["tokenize", "missing.txt", "--tokenizer", "t", "--out", "o"], "missing.txt: no such file"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert data_main(argv) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert err.startswith(f"pyjamba data {argv[0]}: error:")
    assert data_main(["tokenizer", "x"]) == 2  # argparse: --vocab-size and --out are required
