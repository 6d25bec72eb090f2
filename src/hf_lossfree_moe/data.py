"""Text data for causal-LM training: an embedded corpus, an on-the-fly BPE tokenizer, and run_clm-style blocks.

The embedded corpus is text that ships with Python itself (the language reference in `pydoc_data.topics` and the
standard library's docstrings), so the default job needs no download. Real data comes from the Hub or from local
text/JSON/CSV files through `datasets`; either way the result holds a "train" and a "validation" split.
"""

import ast
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from itertools import chain
from pathlib import Path
from pydoc_data.topics import topics

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


EMBEDDED_CORPUS_NAME = "python-docs"
TEXT_COLUMN = "text"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
# `datasets` loader name for each local file extension it can read as text.
FILE_LOADERS = {"txt": "text", "json": "json", "jsonl": "json", "csv": "csv"}
# A .txt file is read as paragraphs (blank-line separated): each becomes one document, ended by eos.
TEXT_LOADER_KWARGS = {"sample_by": "paragraph"}


@cache
def embedded_corpus() -> tuple[str, ...]:
    """Python's language reference, then the docstrings of its standard-library modules, deduplicated.

    The order is fixed (topics by name, modules by name, docstrings in source order), so a given Python version
    always yields the same corpus; it is built once per process. Module sources are parsed, never imported:
    importing `antigravity` opens a browser.
    """
    documents = [topics[name] for name in sorted(topics)]
    documents += chain.from_iterable(_module_docstrings(path) for path in _stdlib_module_files())
    return tuple(dict.fromkeys(text.strip() for text in documents if text.strip()))


def _stdlib_module_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = chain.from_iterable(
        (stdlib / f"{name}.py", stdlib / name / "__init__.py") for name in sorted(sys.stdlib_module_names)
    )
    return [path for path in candidates if path.is_file()]


def _module_docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, documented))
    return [text for text in docstrings if text]


def is_validation_text(text: str, validation_split_percentage: int) -> bool:
    """Hold a document out by a hash of its content: stable across runs, machines and corpus edits elsewhere."""
    return zlib.crc32(text.encode("utf-8")) % 100 < validation_split_percentage


def embedded_datasets(validation_split_percentage: int = 5) -> DatasetDict:
    """The embedded corpus as a `DatasetDict` with a "text" column, split by `is_validation_text`."""
    _check_percentage(validation_split_percentage)
    splits = {"train": [], "validation": []}
    for text in embedded_corpus():
        splits["validation" if is_validation_text(text, validation_split_percentage) else "train"].append(text)
    return DatasetDict({split: Dataset.from_dict({TEXT_COLUMN: texts}) for split, texts in splits.items()})


def check_data_file(path: str, parameter: str) -> None:
    """Raise `ValueError` naming `parameter` unless `path` is an existing, non-blank file `datasets` can read as
    text."""
    if not os.path.isfile(path):
        raise ValueError(f"`{parameter}`: no such file: {path}")
    extension = path.rsplit(".", 1)[-1].lower()
    if extension not in FILE_LOADERS:
        raise ValueError(f"`{parameter}` must end in one of {sorted(FILE_LOADERS)}, got {path}")
    if not _has_text(path):
        raise ValueError(f"`{parameter}` {path} is empty; it needs at least one document of text.")


def _has_text(path: str, chunk_size: int = 1 << 16) -> bool:
    """Whether the file holds anything but whitespace; reads only up to the first character that is not."""
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            if chunk.strip():
                return True
    return False


@dataclass
class TextDatasets:
    """The "train" and "validation" splits, plus where their text comes from (for model cards)."""

    splits: DatasetDict
    source: str
    validation_source: str


def load_text_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_column: str = TEXT_COLUMN,
    validation_split_percentage: int = 5,
    cache_dir: str | None = None,
    token: str | None = None,
) -> TextDatasets:
    """Text from a Hub dataset, local files, or (given neither) the embedded corpus.

    Without a validation split, the first `validation_split_percentage`% of "train" is held out, as run_clm does.
    Raises `ValueError` for a missing file, an empty split, or a `text_column` the data does not have; its message
    names the parameter in backticks, e.g. `train_file`.
    """
    _check_percentage(validation_split_percentage)
    if dataset_name is not None and train_file is not None:
        raise ValueError("Pass either `dataset_name` or `train_file`, not both.")
    if dataset_name is None and train_file is None:
        if validation_file is not None:
            raise ValueError("`validation_file` needs `train_file` (or `dataset_name`).")
        return TextDatasets(
            splits=embedded_datasets(validation_split_percentage),
            source=(
                f"the embedded corpus `{EMBEDDED_CORPUS_NAME}`: the language reference (`pydoc_data.topics`) and "
                f"the standard-library docstrings of Python {sys.version_info.major}.{sys.version_info.minor}, "
                "deduplicated (documentation text under the PSF License)"
            ),
            validation_source=f"{validation_split_percentage}% of the documents, held out by a hash of their text",
        )

    source, load_kwargs = _dataset_source(dataset_name, dataset_config_name, train_file, validation_file)
    load_kwargs.update(cache_dir=cache_dir, token=token)
    named = f"`dataset_name` {dataset_name}" if dataset_name is not None else f"`train_file` {train_file}"
    try:
        raw = load_dataset(source, **load_kwargs)
    except DatasetGenerationError as error:
        raise ValueError(f"{named} could not be read: {error.__cause__ or error}") from None
    if "train" not in raw or len(raw["train"]) == 0:
        raise ValueError(f"{named} holds no training document.")
    if "validation" in raw:
        validation_source = (
            f"the local file `{os.path.basename(validation_file)}`" if validation_file else "its validation split"
        )
    else:
        raw = hold_out(raw["train"], validation_split_percentage, named)
        validation_source = f"the first {validation_split_percentage}% of the training data"
    for split, dataset in raw.items():
        if len(dataset) == 0:
            raise ValueError(f"The {split} split of {named} is empty.")
        if text_column not in dataset.column_names:
            raise ValueError(
                f"`text_column` {text_column!r} is not a column of the {split} split; "
                f"its columns are {dataset.column_names}."
            )
    if dataset_name is not None:
        name = dataset_name if dataset_config_name is None else f"{dataset_name} ({dataset_config_name})"
        text_source = f"the Hub dataset [{name}](https://huggingface.co/datasets/{dataset_name})"
    else:
        text_source = f"the local file `{os.path.basename(train_file)}`"
    return TextDatasets(
        splits=DatasetDict(train=raw["train"], validation=raw["validation"]),
        source=text_source,
        validation_source=validation_source,
    )


def hold_out(train: Dataset, validation_split_percentage: int, named: str) -> DatasetDict:
    """The first `validation_split_percentage`% of `train` as "validation", the rest as "train", as run_clm's
    `train[:N%]` and `train[N%:]` slices (rounded to the closest document); `ValueError` if either would be empty."""

    def num_held_out(percentage: int) -> int:
        return int(round(percentage * len(train) / 100))

    if not 0 < num_held_out(validation_split_percentage) < len(train):
        usable = [percentage for percentage in range(1, 100) if 0 < num_held_out(percentage) < len(train)]
        advice = (
            f"or a `validation_split_percentage` in [{usable[0]}, {usable[-1]}]"
            if usable
            else "or more than one document"
        )
        held_out = "no document" if num_held_out(validation_split_percentage) == 0 else "every document"
        raise ValueError(
            f"`validation_split_percentage` {validation_split_percentage} holds out {held_out} of the {len(train)} "
            f"in {named}; pass `validation_file`, {advice}."
        )
    held_out = range(num_held_out(validation_split_percentage))
    return DatasetDict(train=train.select(range(len(held_out), len(train))), validation=train.select(held_out))


@dataclass
class TextDataArguments:
    """Where the text comes from: the data-source flags every script here shares, for `HfArgumentParser`."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"A `datasets` dataset. Default (with no --train_file): the embedded corpus {EMBEDDED_CORPUS_NAME!r}."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "A local .txt (one document per paragraph), .json/.jsonl or .csv file of training text."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "A local validation file, same format."})
    text_column_name: str = field(default=TEXT_COLUMN, metadata={"help": "The column holding the text."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training data held out when there is no validation split."}
    )

    def load(self, cache_dir: str | None = None, token: str | None = None) -> TextDatasets:
        """`load_text_datasets` with these flags."""
        return load_text_datasets(
            dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name,
            train_file=self.train_file,
            validation_file=self.validation_file,
            text_column=self.text_column_name,
            validation_split_percentage=self.validation_split_percentage,
            cache_dir=cache_dir,
            token=token,
        )


def _dataset_source(
    dataset_name: str | None, dataset_config_name: str | None, train_file: str | None, validation_file: str | None
) -> tuple[str, dict]:
    if dataset_name is not None:
        return dataset_name, {"name": dataset_config_name}
    data_files = {"train": train_file}
    check_data_file(train_file, "train_file")
    if validation_file is not None:
        check_data_file(validation_file, "validation_file")
        data_files["validation"] = validation_file
    loaders = {FILE_LOADERS[path.rsplit(".", 1)[-1].lower()] for path in data_files.values()}
    if len(loaders) > 1:
        raise ValueError(f"`train_file` and `validation_file` must have the same format, got {data_files}.")
    loader = loaders.pop()
    return loader, {"data_files": data_files, **(TEXT_LOADER_KWARGS if loader == "text" else {})}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style: any text encodes, no unknown token) trained on `texts`.

    One `<|endoftext|>` token marks document ends and doubles as bos; a separate pad token keeps padding
    distinguishable from document ends.
    """
    if vocab_size <= 256 + 2:
        raise ValueError(f"`vocab_size` must exceed 258 (256 bytes + 2 special tokens) for BPE, got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def tokenize_and_group(
    raw_datasets: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = TEXT_COLUMN,
    num_proc: int | None = None,
) -> DatasetDict:
    """Tokenize every document (eos appended), concatenate, and cut into `block_size` blocks with labels.

    The tail shorter than a block is dropped, as in run_clm. Raises `ValueError` when a split yields no block.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict) -> dict:
        # verbose=False: documents longer than the model are expected here, they are cut into blocks below.
        encoded = tokenizer(batch[text_column], verbose=False)["input_ids"]
        return {"input_ids": [ids + eos for ids in encoded]}

    def group(batch: dict) -> dict:
        ids = list(chain.from_iterable(batch["input_ids"]))
        blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    tokenized = DatasetDict(
        {
            split: dataset.map(
                tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenize"
            )
            for split, dataset in raw_datasets.items()
        }
    )
    grouped = tokenized.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"Group in {block_size}")
    for split, dataset in grouped.items():
        if len(dataset) == 0:
            tokens = sum(len(ids) for ids in tokenized[split]["input_ids"])
            raise ValueError(
                f"`block_size` {block_size} is larger than the whole {split} split ({tokens} tokens); "
                "use a smaller `block_size` or more data."
            )
    return grouped


def _check_percentage(validation_split_percentage: int) -> None:
    if not 0 < validation_split_percentage < 100:
        raise ValueError(
            f"`validation_split_percentage` must be an integer in [1, 99], got {validation_split_percentage}."
        )
