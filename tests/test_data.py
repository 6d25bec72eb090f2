import inspect
import json
import zlib
from itertools import chain
from pydoc_data.topics import topics

import pytest
from datasets import Dataset, DatasetDict

from hf_lossfree_moe import data
from hf_lossfree_moe.data import (
    EOS_TOKEN,
    PAD_TOKEN,
    TextDataArguments,
    embedded_corpus,
    embedded_datasets,
    load_text_datasets,
    tokenize_and_group,
    train_bpe_tokenizer,
)


TEXTS = [
    "The for statement is used to iterate over the elements of a sequence.",
    "A while loop repeats as long as an expression is true.",
    "Functions are defined with the def keyword and return values with return.",
    "Classes bundle data and functionality together.",
] * 20


@pytest.fixture(scope="module")
def corpus():
    return embedded_corpus()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300, model_max_length=64)


def test_embedded_corpus_starts_with_the_language_reference_in_name_order(corpus):
    first_topics = [topics[name].strip() for name in sorted(topics)[:5]]
    assert list(corpus[:5]) == first_topics


def test_embedded_corpus_holds_stdlib_docstrings_without_duplicates(corpus):
    assert inspect.cleandoc(json.__doc__) in corpus
    assert inspect.cleandoc(json.dumps.__doc__) in corpus
    assert len(set(corpus)) == len(corpus)
    assert all(text == text.strip() and text for text in corpus)
    assert sum(map(len, corpus)) > 1_000_000  # enough text for a few minutes of training


def test_embedded_split_holds_out_documents_by_content_hash(monkeypatch):
    documents = [f"document number {i}" for i in range(200)]
    monkeypatch.setattr(data, "embedded_corpus", lambda: documents)
    splits = embedded_datasets(validation_split_percentage=10)
    expected = [text for text in documents if zlib.crc32(text.encode()) % 100 < 10]
    assert splits["validation"]["text"] == expected
    assert splits["train"]["text"] == [text for text in documents if text not in expected]


def test_bpe_tokenizer_round_trips_any_text_and_has_distinct_eos_and_pad(tokenizer):
    text = "def f(x):\n    return x ** 2  # ünïcode ✓ 🐍"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer) == 300
    assert tokenizer.eos_token == tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.model_max_length == 64


def test_bpe_tokenizer_rejects_a_vocabulary_without_room_for_merges():
    with pytest.raises(ValueError, match="`vocab_size` must exceed 258"):
        train_bpe_tokenizer(TEXTS, vocab_size=258, model_max_length=64)


def test_tokenize_and_group_appends_eos_and_cuts_equal_blocks(tokenizer):
    raw = load_text_datasets_from(TEXTS[:4], TEXTS[:2])
    blocks = tokenize_and_group(raw, tokenizer, block_size=8)
    stream = list(chain.from_iterable(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS[:4]))
    expected = [stream[i : i + 8] for i in range(0, len(stream) - 7, 8)]
    assert blocks["train"]["input_ids"] == expected
    assert blocks["train"]["labels"] == expected


def test_tokenize_and_group_rejects_a_block_longer_than_the_split(tokenizer):
    raw = load_text_datasets_from(TEXTS[:4], ["short"])
    tokens = len(tokenizer("short")["input_ids"]) + 1  # + eos
    with pytest.raises(
        ValueError, match=rf"`block_size` 16 is larger than the whole validation split \({tokens} tokens\)"
    ):
        tokenize_and_group(raw, tokenizer, block_size=16)


def test_csv_without_validation_file_holds_out_its_first_rows(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,text\n" + "".join(f"{i},row {i}\n" for i in range(20)))
    loaded = load_text_datasets(train_file=str(path), validation_split_percentage=10)
    assert loaded.splits["validation"]["text"] == ["row 0", "row 1"]
    assert loaded.splits["train"]["text"] == [f"row {i}" for i in range(2, 20)]
    assert "train.csv" in loaded.source


def test_text_data_arguments_pass_every_flag_to_the_loader(tmp_path):
    """A .jsonl file with its text under "content", 20% held out: the first 4 of 20 rows become validation."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(20)))
    arguments = TextDataArguments(train_file=str(path), text_column_name="content", validation_split_percentage=20)
    loaded = arguments.load()
    assert loaded.splits["validation"]["content"] == [f"doc {i}" for i in range(4)]
    assert loaded.splits["train"]["content"] == [f"doc {i}" for i in range(4, 20)]
    with pytest.raises(ValueError, match="either `dataset_name` or `train_file`"):
        TextDataArguments(dataset_name="x", train_file=str(path)).load()


def test_txt_files_are_read_as_paragraphs(tmp_path):
    train, validation = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    validation.write_text("held out\n")
    loaded = load_text_datasets(train_file=str(train), validation_file=str(validation))
    assert loaded.splits["train"]["text"] == ["first paragraph\nstill first", "second paragraph\n"]
    assert loaded.splits["validation"]["text"] == ["held out\n"]


def test_unknown_text_column_names_the_available_columns(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"`text_column` 'text' is not a column .* \['content'\]"):
        load_text_datasets(train_file=str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_file": "missing.csv"}, "`train_file`: no such file: missing.csv"),
        ({"train_file": __file__}, r"`train_file` must end in one of \['csv', 'json', 'jsonl', 'txt'\]"),
        ({"dataset_name": "x", "train_file": __file__}, "either `dataset_name` or `train_file`"),
        ({"validation_file": __file__}, "`validation_file` needs `train_file`"),
        ({"validation_split_percentage": 0}, r"`validation_split_percentage` must be an integer in \[1, 99\]"),
    ],
)
def test_bad_data_arguments_raise_value_errors_naming_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_text_datasets(**kwargs)


def load_text_datasets_from(train_texts, validation_texts):
    return DatasetDict(
        train=Dataset.from_dict({"text": train_texts}), validation=Dataset.from_dict({"text": validation_texts})
    )
