"""Training data as people have it (an auditor's files): multi-turn chats, long replies, extra
columns, other tools' layouts and file conventions. Each is read right or refused by name."""

from __future__ import annotations

import json
import logging

import pytest
from fedprefix.client.data import read_rows, tokenize_rows
from fedprefix.common.errors import DataError

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1 first reply"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2 second reply"},
    ]
}


def _decoded(tokenizer, examples):
    return [(tokenizer.decode(e.prompt), tokenizer.decode(e.completion)) for e in examples]


def test_every_assistant_turn_of_a_chat_is_trained_behind_the_conversation_before_it(tiny_llama):
    """Only the last reply was trained (5 of 40 tokens); OpenAI and TRL train every one."""
    tok = tiny_llama.tokenizer
    (first, first_reply), (second, second_reply) = _decoded(tok, tokenize_rows(read_rows([CHAT]), tok, 512, True))
    assert first.endswith("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n") and "A1" not in first
    assert first_reply == "A1 first reply<|im_end|>" and second_reply == "A2 second reply<|im_end|>"
    assert second == first + "A1 first reply<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    weighted = json.loads(json.dumps(CHAT))
    weighted["messages"][2]["weight"] = 0  # OpenAI's format: context, not trained on
    ((prompt, reply),) = _decoded(tok, tokenize_rows(read_rows([weighted]), tok, 512, True))
    assert (prompt, reply) == (second, second_reply)


def test_a_long_completion_keeps_its_prompt_and_loses_its_end(tiny_llama, caplog):
    """A completion of max_length tokens or more had lost its whole prompt: trained with no question."""
    tok = tiny_llama.tokenizer
    row = {"prompt": "Tell me a story.", "completion": "word " * 500}
    with caplog.at_level(logging.WARNING):
        (example,) = tokenize_rows(read_rows([row]), tok, 128, use_chat_template=True)
    prompt = tok.decode(example.prompt)
    assert prompt.startswith("<|im_start|>user\nTell me a story.") and len(example.prompt) < 64
    assert len(example.prompt) + len(example.completion) == 128 and tok.decode(example.completion).startswith("word ")
    assert "0 prompts lost tokens on the left, 1 lost completion tokens on the right" in caplog.text
    both = {"prompt": "context " * 100, "completion": "word " * 100}  # both long: the prompt keeps half
    (example,) = tokenize_rows(read_rows([both]), tok, 64, use_chat_template=False)
    assert len(example.prompt) == 32 and len(example.completion) == 32


def test_columns_beyond_a_row_form_are_left_aside(tmp_path, caplog):
    rows = [{"id": 7, "prompt": "p", "completion": "c", "source": "web"}, {"text": "t", "score": 0.5}]
    with caplog.at_level(logging.INFO):
        read = read_rows(rows)
    assert [getattr(r, "prompt", r) for r in read] == ["p", "t"]
    assert "left aside: id, score, source" in caplog.text
    csv = tmp_path / "rows.csv"
    csv.write_text("id,prompt,completion,notes\n1,p,c,n\n")
    assert read_rows(csv)[0].completion == "c"


def test_iterables_of_rows_are_rows_and_a_dataframe_gives_its_records():
    rows = [{"prompt": "p", "completion": "c"}, "plain"]
    assert read_rows(iter(rows)) == read_rows(rows) == read_rows(tuple(rows))

    class Frame:  # what a pandas DataFrame looks like here: iterating it gives column names
        columns = ["prompt", "completion"]

        def __iter__(self):
            return iter(self.columns)

        def to_dict(self, orient):
            assert orient == "records"
            return [{"prompt": "p", "completion": "c"}]

    assert read_rows(Frame()) == read_rows(rows[:1])


def test_a_json_file_holds_an_array_of_rows_or_json_lines(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, "plain"]
    array, lines = tmp_path / "array.json", tmp_path / "lines.json"
    array.write_text(json.dumps(rows, indent=2))
    lines.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_rows(array) == read_rows(lines) == read_rows(rows)
    array.write_text('[{"prompt": "p"}]')
    with pytest.raises(DataError, match=r"array.json item 0: field 'completion'"):
        read_rows(array)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("rows.jsonl", '[{"prompt": "p", "completion": "c"}]', r"line 1: a JSON array; a .jsonl file holds one row"),
        ("rows.csv", "prompt;completion\np;c\n", r"the header seems separated by ';'"),
        ("rows.csv", "prompt\tcompletion\np\tc\n", r"the header seems separated by '\\t'"),
        ("rows.csv", "Prompt,Completion\np,c\n", r"column names are exact, lower case and without spaces: 'Prompt'"),
    ],
)
def test_file_conventions_of_other_tools_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_a_file_saved_in_a_windows_code_page_names_its_line_and_the_way_out(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("prompt,completion\np,c\ncaf\xe9,c\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"rows.csv line 3 is not UTF-8 text \(byte \d+ is invalid\): save the file as"):
        read_rows(path)


def test_parquet_messages_without_the_null_fields_of_other_messages_or_as_json_text(tmp_path):
    """pyarrow gives every message of a column each field any message has (None elsewhere): every
    row was refused at messages.0.name, and a messages column of JSON text was refused too."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 1}]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": chat}, {"messages": chat[:1] + [chat[1] | {"weight": 0}]}]), path)
    with pytest.raises(DataError, match="row 1: field 'messages': no assistant reply to learn"):
        read_rows(path)
    pq.write_table(pa.Table.from_pylist([{"messages": chat}]), path)
    assert [m.role for m in read_rows(path)[0].messages] == ["user", "assistant"]
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(chat)}]), path)
    assert read_rows(path)[0].messages[1].content == "yo"


def test_a_held_out_split_keeps_each_chat_whole(tiny_llama):
    """A chat gives one example per reply; a reply held out while the next trained would put the
    held-out reply in a trained prompt."""
    from fedprefix.client.training import split_examples

    examples = tokenize_rows(read_rows([CHAT] * 10), tiny_llama.tokenizer, 512, True)
    assert len(examples) == 20
    train, held = split_examples(examples, 0.3, seed=0)
    assert len(held) == 6 and len(train) == 14
    assert not {e.row for e in train} & {e.row for e in held}


def test_rows_added_for_the_next_fit_keep_its_held_out_rows_held_out(tiny_llama):
    """A user who fits again with more rows: a shuffle of all rows put a third or more of the new
    held-out set among rows the previous fit had trained on, so early stopping judged the
    continued prefix partly on its own training rows."""
    from fedprefix.client.training import split_examples
    from fedprefix.simulations.personas import training_rows, user_dataset

    rows = list({json.dumps(row, sort_keys=True): row for row in training_rows(user_dataset(1, 90)["train"])}.values())
    assert len(rows) >= 60  # distinct rows, so that each is told apart below
    for seed in range(5):
        before = tokenize_rows(read_rows(rows[:40]), tiny_llama.tokenizer, 512, True)
        after = tokenize_rows(read_rows(rows[:60]), tiny_llama.tokenizer, 512, True)
        trained = {tuple(e.prompt + e.completion) for e in split_examples(before, 0.1, seed)[0]}
        held_before = {tuple(e.prompt + e.completion) for e in split_examples(before, 0.1, seed)[1]}
        held_after = {tuple(e.prompt + e.completion) for e in split_examples(after, 0.1, seed)[1]}
        assert len(held_before) == 4 and len(held_after) == 6
        # at most max_rows held out: the first of the same order
        held_capped = {tuple(e.prompt + e.completion) for e in split_examples(after, 0.1, seed, max_rows=4)[1]}
        assert len(held_capped) == 4 and held_capped < held_after
        # at most the two places the larger set adds can go to rows the first fit trained on
        assert len(held_after & trained) <= len(held_after) - len(held_before), seed


def test_a_user_column_outside_federation_data_is_refused_not_left_aside():
    """A device's data-path at the run's combined file would train on every user's rows."""
    with pytest.raises(DataError, match="row 0: a 'user' column: rows of several users?"):
        read_rows([{"user": "bob", "prompt": "p", "completion": "c"}])


def test_an_open_file_or_a_set_is_refused_and_frames_give_their_records(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n')
    with open(path) as fh, pytest.raises(DataError, match="local_data is an open file: pass its path"):
        read_rows(fh)  # its lines had become plain-text rows: the JSON trained as text
    with pytest.raises(DataError, match=r"local_data is a set \(rows keep their order\); give a list of rows"):
        read_rows({"a", "b"})

    class Pandas:  # pandas: to_dict("records"), a missing cell is NaN
        columns = ["prompt", "completion", "text"]

        def to_dict(self, orient):
            return [{"prompt": "p", "completion": "c", "text": float("nan")}]

    class Polars:  # polars: to_dicts()
        columns = ["prompt", "completion"]

        def to_dicts(self):
            return [{"prompt": "p", "completion": "c"}]

    assert read_rows(Pandas()) == read_rows(Polars()) == read_rows(path)


@pytest.mark.parametrize("text", ["What is 3.14", "I love node.js", "a.b c", "Version 2.0"])
def test_text_with_a_dot_is_a_single_string_not_a_file_type(text):
    with pytest.raises(DataError, match="local_data is a single string"):
        read_rows(text)


def test_a_long_chat_loses_its_oldest_exchanges_and_keeps_its_system_message(tiny_llama, caplog):
    """A left cut took the system message first (an auditor's 'IMPORTANT SYSTEM RULES')."""
    tok = tiny_llama.tokenizer
    turns = [{"role": "system", "content": "RULES"}]
    for n in range(4):
        turns += [{"role": "user", "content": f"question {n} " + "x" * 60}, {"role": "assistant", "content": f"A{n}"}]
    turns[-3]["weight"] = turns[-5]["weight"] = turns[-7]["weight"] = 0  # train the last reply only
    with caplog.at_level(logging.WARNING):
        (example,) = tokenize_rows(read_rows([{"messages": turns}]), tok, 200, True)
    prompt = tok.decode(example.prompt)
    assert prompt.startswith("<|im_start|>system\nRULES<|im_end|>\n<|im_start|>user\nquestion ")
    assert "question 3" in prompt and "question 0" not in prompt and tok.decode(example.completion) == "A3<|im_end|>"
    assert "1 chat prompts lost their oldest exchanges" in caplog.text


def test_a_json_file_of_one_object_says_what_a_json_file_holds(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}, indent=2))
    with pytest.raises(DataError, match="rows.json is one JSON object; a .json file holds an array of rows"):
        read_rows(path)


def test_a_refused_parquet_row_names_its_null_cells(tmp_path):
    """A null prompt read as a missing field: 'Field required' with no word of the null."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": None, "completion": "c"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"rows.parquet row 1 \(null cells: prompt\): field 'prompt': Field required"):
        read_rows(path)


def test_chat_rows_on_a_base_without_a_chat_template_are_refused_by_name(tiny_llama):
    """transformers raised its own ValueError from deep inside apply_chat_template."""
    import copy

    plain = copy.deepcopy(tiny_llama.tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="chat rows .messages. need a base with a chat template"):
        tokenize_rows(read_rows([CHAT]), plain, 512, use_chat_template=False)
