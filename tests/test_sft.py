"""SFT data: chat JSON lines rendered with the chat template, labels only on the assistant's tokens.

The oracle for the masks: the templates here write every turn as segments whose tokenizations
concatenate to the whole (each segment boundary is a special token or a newline), so the expected
assistant tokens are those of the assistant segments, tokenized on their own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pyjamba.data import (
    DataError,
    SFTDataset,
    encode_conversation,
    read_conversations,
    sft_collate,
    train_tokenizer,
)
from pyjamba.tokenizer import Tokenizer

CONVERSATIONS = [
    [
        {"role": "user", "content": "Who is Emma?"},
        {"role": "assistant", "content": "A young lady of Highbury, handsome, clever, and rich."},
    ],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Where is Hartfield?"},
        {"role": "assistant", "content": "Near Highbury; café £5 🙂"},
        {"role": "user", "content": "And Donwell?"},
        {"role": "assistant", "content": "Mr. Knightley's estate.\n\nIt is close by."},
    ],
    [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Thanks."},
    ],
]

# Zephyr-like: role markers written as plain text, the assistant's turn closed by the EOS token.
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Alpaca-like: the content follows `### Assistant:` and a space, so a token straddles the boundary.
ALPACA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '### Assistant: ' + m['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ '### ' + m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    words = ["Emma", "Highbury", "Hartfield", "Knightley", "young", "lady", "clever", "rich", "who", "where"]
    words += ["is", "the", "of", "and", "a"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    (folder / "text.txt").write_text("\n".join(lines) + "\n")
    return Tokenizer.from_pretrained(train_tokenizer([folder / "text.txt"], 350, folder / "tok"))


def _chatml_segments(messages):
    """(text, is_assistant) segments of the ChatML rendering."""
    segments = [("<|bos|>", False)]
    for m in messages:
        mine = m["role"] == "assistant"
        segments += [
            (f"<|im_start|>{m['role']}\n", False),
            (m["content"], mine),
            ("<|im_end|>", mine),
            ("\n", False),
        ]
    return segments


def _zephyr_segments(messages):
    segments = []
    for m in messages:
        mine = m["role"] == "assistant"
        segments += [(f"<|{m['role']}|>\n", False), (m["content"], mine), ("<|eos|>", mine), ("\n", False)]
    return segments


def _expected(tok, segments):
    ids, mask = [], []
    for text, mine in segments:
        part = tok.encode(text, add_special_tokens=False) if text else []
        ids += part
        mask += [mine] * len(part)
    return ids, mask


@pytest.mark.parametrize("template, segments", [(None, _chatml_segments), (ZEPHYR, _zephyr_segments)])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_masks_are_exactly_the_assistant_tokens(tok, template, segments, messages):
    ids, mask = encode_conversation(tok, messages, chat_template=template)
    expected_ids, expected_mask = _expected(tok, segments(messages))
    assert ids == expected_ids == tok.apply_chat_template(messages, tokenize=True, chat_template=template)
    assert mask == expected_mask
    # the end-of-turn token is learnt, the newline after it is not
    end = tok.eos_token_id if template else tok.token_to_id("<|im_end|>")
    ends = [i for i, t in enumerate(ids) if t == end]
    assert [mask[i] for i in ends] == [m["role"] == "assistant" for m in messages]
    assert all(not mask[i + 1] for i in ends if i + 1 < len(ids))


def test_a_token_across_the_boundary_belongs_to_the_assistant(tok):
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Emma is clever."}]
    assert len(tok.encode(" Emma", add_special_tokens=False)) == 1  # the header's space joins the answer
    ids, mask = encode_conversation(tok, messages, chat_template=ALPACA)
    learnt = tok.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    # " Emma" holds the header's space: it is learnt whole; the blank line after EOS is not.
    assert learnt == " Emma is clever.<|eos|>"


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    rewriting = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="prefix"):
        encode_conversation(tok, CONVERSATIONS[0], chat_template=rewriting)


def _write(path: Path, conversations) -> Path:
    path.write_text("\n".join(json.dumps({"messages": c}) for c in conversations) + "\n", encoding="utf-8")
    return path


def test_dataset_items_and_collate(tok, tmp_path):
    data = SFTDataset(_write(tmp_path / "chat.jsonl", CONVERSATIONS), tok, max_length=256)
    assert len(data) == 3 and data.dropped == 0
    for i, messages in enumerate(CONVERSATIONS):
        item = data[i]
        ids, mask = encode_conversation(tok, messages)
        assert item["input_ids"].tolist() == ids and item["assistant_mask"].tolist() == mask
        labels = item["labels"].tolist()
        assert labels[-1] == -100
        assert labels[:-1] == [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
    batch = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=data.collate).__iter__().__next__()
    lengths = [len(data[0]["input_ids"]), len(data[1]["input_ids"])]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert batch["attention_mask"][short].tolist() == [1] * min(lengths) + [0] * (max(lengths) - min(lengths))
    assert torch.all(batch["input_ids"][short, min(lengths) :] == tok.pad_token_id)
    assert torch.all(batch["labels"][short, min(lengths) - 1 :] == -100)
    assert torch.equal(sft_collate([data[0]], data.pad_id)["labels"][0], data[0]["labels"])


def test_empty_answer_learns_only_its_end_token(tok):
    ids, mask = encode_conversation(tok, CONVERSATIONS[2])
    assert [t for t, m in zip(ids, mask, strict=True) if m] == [tok.token_to_id("<|im_end|>")]


def test_truncation_drops_conversations_without_answers(tok, tmp_path):
    path = _write(tmp_path / "chat.jsonl", CONVERSATIONS[:1])
    prompt = len(tok.apply_chat_template(CONVERSATIONS[0][:1], add_generation_prompt=True, tokenize=True))
    one = SFTDataset(path, tok, max_length=prompt + 1)  # the prompt and the answer's first token
    assert len(one) == 1 and one.dropped == 0 and len(one[0]["input_ids"]) == prompt + 1
    assert (one[0]["labels"] != -100).tolist() == [False] * (prompt - 1) + [True, False]
    none = SFTDataset(path, tok, max_length=prompt)
    assert len(none) == 0 and none.dropped == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"chat\.jsonl:2: not valid JSON"),
        ('{"conversation": []}', r":2: expected an object"),
        ('{"messages": []}', r":2: messages is empty"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', r":2: messages\[0\] has role 'bot'"),
        ('{"messages": [{"role": "user"}]}', r":2: messages\[0\] \(user\) has no 'content'"),
        ('{"messages": [{"role": "user", "content": ["a"]}]}', r"'content' is a list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', r":2: no assistant message"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', r":2: messages\[0\] is the assistant's"),
        ('{"messages": ["hi"]}', r"messages\[0\] is a str"),
    ],
)
def test_malformed_lines_name_their_line(tok, tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + line + "\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_conversations(path)
    with pytest.raises(DataError, match=message):
        SFTDataset(path, tok, max_length=64)


def test_missing_file(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        SFTDataset(tmp_path / "none.jsonl", tok, max_length=64)
