"""local_data validation and tokenization: every bad row names its index (or line) and field."""

from __future__ import annotations

import json
import logging
import traceback

import pytest
from fedprefix.client.data import read_rows, tokenize_rows
from fedprefix.common.errors import DataError


def test_accepts_all_row_forms(tmp_path):
    rows = [
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "plain text",
    ]
    assert len(read_rows(rows)) == 3
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert len(read_rows(path)) == 3 and len(read_rows(str(path))) == 3


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "local_data is empty"),
        ([{"prompt": "only a prompt"}], "row 0: field 'completion': Field required"),
        ([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}], "row 1: field 'completion'"),
        ([{"prompt": "p", "completion": "c", "text": "t"}], "row 0: the row has keys of two row forms (prompt, "),
        ([{"instruction": "i", "input": "", "output": "o"}], "It looks like Alpaca's instruction/input/output"),
        ([{"conversations": [{"from": "human", "value": "hi"}]}], "It looks like ShareGPT's conversations"),
        ([{"id": 3}], "row 0: a row needs prompt and completion, messages, or text; it has 'id'"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": []}]}],
            "row 0: field 'messages': tool calls (tool_calls) are not supported",
        ),
        (
            [{"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]}],
            "only an assistant message takes a weight",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}],
            "no assistant reply to learn (each has weight 0)",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}],
            "messages.1.weight",
        ),
        ([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}], "assistant's reply"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}],
            "field 'messages.1': an assistant reply (a completion) is blank",
        ),
        ([{"messages": [{"role": "robot", "content": "a"}, {"role": "user", "content": "b"}]}], "messages.0.role"),
        ([3], "row 0: expected an object or a string, got int"),
        (["  "], "row 0: empty text"),
        # JSON's "\ud800" escape gives a lone surrogate, which no tokenizer takes
        ([{"prompt": "a\ud800b", "completion": "c"}], "row 0: field 'prompt': not valid Unicode: a lone surrogate"),
        (["ok", "plain \udc00"], "row 1: not valid Unicode: a lone surrogate at character 6"),
        ([{"messages": [{"role": "user", "content": "\ud83d"}, {"role": "assistant", "content": "b"}]}], "messages.0"),
    ],
)
def test_bad_rows_name_index_and_field(rows, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rows(rows)


SECRET = "MY PRIVATE MEDICAL QUESTION"


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": {"nested": SECRET}, "completion": "c"},
        {"prompt": "p", "completion": [SECRET]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": SECRET}]},
                {"role": "assistant", "content": "b"},
            ]
        },
        {"messages": SECRET},
        {"messages": [{"role": SECRET, "content": "a"}, {"role": "assistant", "content": "b"}]},
    ],
)
def test_a_bad_rows_text_is_in_no_part_of_its_error_or_traceback(row):
    """A node's traceback reaches the run's log (through Ray): pydantic's errors carried the
    whole value of a wrong-typed field."""
    with pytest.raises(DataError) as raised:
        read_rows([row])
    assert SECRET not in "".join(traceback.format_exception(raised.value))


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9", "completion": "x"}'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_rows(latin)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_rows(broken)
    with pytest.raises(DataError, match="single string"):
        read_rows("not a path")


def test_completion_only_labels_and_left_truncation(tiny_llama, caplog):
    tok = tiny_llama.tokenizer
    rows = read_rows([{"prompt": "x" * 50, "completion": "abc"}, {"prompt": "short", "completion": "de"}])
    with caplog.at_level(logging.WARNING):
        examples = tokenize_rows(rows, tok, max_length=20, use_chat_template=False)
    assert "1 of 2 completions were longer than 20 tokens with their prompts: 0 chat prompts lost" in caplog.text
    assert "1 prompts lost tokens on the left, 0 lost completion tokens" in caplog.text
    first = examples[0]
    assert len(first.prompt) + len(first.completion) == 20
    assert tok.decode(first.completion) == "abc<|im_end|>"  # completion kept whole, EOS appended
    assert tok.decode(examples[1].prompt) == "short"


def test_a_huge_row_is_cut_before_it_is_tokenized_with_the_same_tokens(tiny_llama, caplog, monkeypatch):
    """A 50 MB line once took 71 s and 9.5 GB to tokenize whole, for 256 tokens kept."""
    from fedprefix.client import data

    rows = read_rows(
        [{"prompt": "ab " * 100_000, "completion": "word " * 100_000}, {"prompt": "q " * 9_000, "completion": "a"}]
    )
    with caplog.at_level(logging.WARNING):
        cut = tokenize_rows(rows, tiny_llama.tokenizer, 64, use_chat_template=False)
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 10**9)  # tokenized whole, as before
    assert tokenize_rows(rows, tiny_llama.tokenizer, 64, use_chat_template=False) == cut
    assert "2 prompts lost tokens on the left, 1 lost completion tokens on the right" in caplog.text


def test_chat_rows_use_the_template(tiny_llama):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (example,) = tokenize_rows(read_rows([row]), tiny_llama.tokenizer, 128, use_chat_template=True)
    prompt = tiny_llama.tokenizer.decode(example.prompt)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("local_data", "message"),
    [
        ({"prompt": "p", "completion": "c"}, r"a single row \(a dict with keys \['completion', 'prompt'\]\)"),
        ("just some text", "a single string"),
        (42, "must be a list of rows or a path to a .jsonl, .json, .csv or .parquet file, not int"),
        ("rows.jsonl.gz", r"rows.jsonl.gz: unknown file type '.gz'; data files end in .jsonl, .json, .csv or .parquet"),
        ("data/rows.tsv", "unknown file type '.tsv'"),
        (b"bytes", "local_data is bytes"),
    ],
)
def test_a_single_row_or_a_bare_value_is_refused_before_training(local_data, message):
    with pytest.raises(DataError, match=message):
        read_rows(local_data)


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    """JSON writes U+2028, U+2029 and U+0085 as they are (ensure_ascii=False); only \\n ends a line."""
    rows = [{"prompt": f"line{sep}break", "completion": "ok"} for sep in ("\u2028", "\u2029", "\u0085")]
    path = tmp_path / "seps.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    assert [row.prompt for row in read_rows(path)] == [r["prompt"] for r in rows]


def test_a_stray_quote_in_a_csv_is_an_error_not_one_cell_holding_the_rest(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\na,"b\nc,d\ne,f\n')  # the quote before b never closes
    with pytest.raises(DataError, match="rows.csv line .*a quoted cell is never closed"):
        read_rows(str(path))
    path.write_text('prompt,completion\n"a"x,b\n')
    with pytest.raises(DataError, match="not valid CSV"):
        read_rows(str(path))
    path.write_text('prompt,completion\na,"b ""q"" c"\n')  # doubled quotes inside a quoted cell: fine
    assert [(r.prompt, r.completion) for r in read_rows(str(path))] == [("a", 'b "q" c')]


def test_a_csv_header_of_no_known_form_names_its_columns_and_long_cells_are_data(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt, completion\na,b\n")  # the space belongs to the column's name
    with pytest.raises(DataError, match=r"line 1: columns \['prompt', ' completion'\]; rows need prompt and"):
        read_rows(str(path))
    path.write_text("prompt,completion\na," + "b" * 200_000 + "\n")  # past the csv module's 128 Ki default
    assert len(read_rows(str(path))[0].completion) == 200_000


def test_a_long_chat_loses_the_fewest_oldest_exchanges_found_with_few_tokenizations():
    """Dropping one exchange at a time, tokenizing the rest each time, took cubic time in a chat's
    length (33 s for one row of 300 messages); the same exchanges are dropped, in log2 tries."""
    from fedprefix.client.data import TrainingMessage, drop_oldest_exchanges

    history = [TrainingMessage(role="system", content="s" * 7)]
    for i in range(150):  # now and then two user turns in a row: an exchange ends at a user turn
        history += [TrainingMessage(role="user", content="u" * (i % 13 + 1))]
        history += [TrainingMessage(role="user" if i % 17 == 5 else "assistant", content="a" * (i % 7 + 1))]
    history = history[:-1]  # the prompt of the last reply
    tokens = lambda messages: sum(len(m.content) for m in messages)  # noqa: E731  (one per character)

    def one_by_one(room: int) -> int:
        """The rule: the oldest exchange goes until the prompt fits, or only the last user turn is left."""
        system, rest = history[:1], history[1:]
        while users := [i for i in range(1, len(rest)) if rest[i].role == "user"]:
            rest = rest[users[0] :]
            if tokens(system + rest) <= room:
                break
        return tokens(system + rest)

    calls = []

    def prompt_of(kept: list) -> list[int]:
        calls.append(kept)
        return [0] * tokens(kept)

    for room in (0, 1, 8, 9, 30, 200, 700, 1000):  # the whole history holds 1,627
        calls.clear()
        prompt = drop_oldest_exchanges(history, prompt_of, room)
        assert prompt is not None and len(prompt) == one_by_one(room) and len(calls) <= 9, room


def test_texts_tokenized_in_batches_get_the_ids_each_gets_alone(tiny_llama, monkeypatch):
    """One tokenizer call per text took most of the time of 100,000 rows; batches give the same
    ids, an empty text none, across batch boundaries."""
    from fedprefix.client import data

    monkeypatch.setattr(data, "TOKENIZER_BATCH", 7)
    texts = ["", "plain words", "ünïcode ✓ 鍵", " leading space", "", "a\nnew line", *[f"row {i}" for i in range(11)]]
    alone = [tiny_llama.tokenizer(text, add_special_tokens=False).input_ids if text else [] for text in texts]
    assert (
        data.token_ids(tiny_llama.tokenizer, texts) == alone
        and data.token_ids(tiny_llama.tokenizer, [""] * 9) == [[]] * 9
    )
