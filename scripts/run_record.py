"""What a training run of `train.py` was asked to do, kept beside its checkpoints so that resuming restores the run.

`run_record.json` goes into every checkpoint and into the final model folder. It holds the arguments the run was
given (command-line flags or argument-file keys; local paths made absolute, so a resume from another folder finds
them; tokens never written) and which data source fed which optimizer steps, with the size and SHA-256 of its local
files. Resuming reads it back: an argument not given again comes from the run, the output folder is the checkpoint's
parent, and a data source other than the run's, or a data file changed since, is an error unless
`--resume_with_new_data` asks for it.
"""

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_lossfree_moe.checkpoints import checkpoint_step
from hf_lossfree_moe.data import EMBEDDED_CORPUS_NAME


RUN_RECORD_FILE = "run_record.json"
# The flags that say where the text comes from, in two groups that exclude each other.
HUB_SOURCE_FIELDS = ("dataset_name", "dataset_config_name")
FILE_SOURCE_FIELDS = ("train_file", "validation_file")
DATA_SOURCE_FIELDS = HUB_SOURCE_FIELDS + FILE_SOURCE_FIELDS
# Arguments that may name a local file or folder: recorded as absolute paths when they exist.
PATH_FIELDS = ("train_file", "validation_file", "model_name_or_path", "config_name", "tokenizer_name", "cache_dir")
# Arguments that belong to one invocation, not to the run: where and whether to resume, where to write, what may
# be overwritten or switched.
PER_INVOCATION_FIELDS = ("resume_from_checkpoint", "output_dir", "overwrite_output_dir", "resume_with_new_data")
UNRECORDED_DATA = f"data the checkpoint does not record (it holds no {RUN_RECORD_FILE})"


def given_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The arguments `argv` sets explicitly, by field name, typed as `parser` types them; defaults are left out.

    `parser` is used up: its defaults are suppressed so that only what `argv` names remains.
    """
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def with_absolute_paths(arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` with every existing local path among `PATH_FIELDS` made absolute."""
    return {
        name: os.path.abspath(value)
        if name in PATH_FIELDS and isinstance(value, str) and os.path.exists(value)
        else value
        for name, value in arguments.items()
    }


def recordable(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments that define the run: no per-invocation flag, no secret."""
    return {
        name: value
        for name, value in arguments.items()
        if name not in PER_INVOCATION_FIELDS and name != "token" and not name.endswith("_token")
    }


def describe_source(flags: dict[str, str | None]) -> str:
    """The data-source flags as a user would type them, or the embedded corpus when none is set."""
    given = [f"--{name} {value}" for name, value in flags.items() if value is not None]
    return " ".join(given) if given else f"the embedded corpus {EMBEDDED_CORPUS_NAME!r}"


def fingerprint(path: str) -> dict[str, int | str]:
    """Size and SHA-256 of a file's content: a hash, not the modification time, so that a copy of the same file
    passes; reading costs about a second per GB."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def file_fingerprints(flags: dict[str, str | None]) -> dict[str, dict[str, int | str]]:
    """The fingerprint of each local data file among `flags`, by flag name."""
    return {
        name: fingerprint(flags[name])
        for name in FILE_SOURCE_FIELDS
        if flags.get(name) is not None and os.path.isfile(flags[name])
    }


@dataclass
class DataSegment:
    """Optimizer steps `first_step` to `last_step` (1-based, inclusive) read the data of `flags`, whose local files
    had the fingerprints `files`."""

    flags: dict[str, str | None]
    description: str
    first_step: int
    last_step: int
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)


@dataclass
class RunRecord:
    """The recorded arguments of a run and the data source of each stretch of its optimizer steps."""

    arguments: dict[str, Any] = field(default_factory=dict)
    data_sources: list[DataSegment] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(content["arguments"], [DataSegment(**segment) for segment in content["data_sources"]])

    def source_flags(self) -> dict[str, str | None]:
        return {name: self.arguments.get(name) for name in DATA_SOURCE_FIELDS}

    def start_training(self, description: str, new_data: bool = False) -> None:
        """The steps from here on read the recorded data source: continue its segment, or open a new one.

        Raises `ValueError` when a local file of the segment to continue changed, unless `new_data` allows it.
        """
        flags = self.source_flags()
        files = file_fingerprints(flags)
        last = self.data_sources[-1] if self.data_sources else None
        if last is not None and last.flags == flags:
            changed = [name for name in last.files if files.get(name) != last.files[name]]
            if not changed:
                return
            if not new_data:
                name = changed[0]
                raise ValueError(
                    f"--{name} {flags[name]} changed since the checkpoint's run read it (size and SHA-256 differ "
                    "from its run_record.json); restore the file, or pass --resume_with_new_data to train on it as "
                    "it is now."
                )
        next_step = last.last_step + 1 if last is not None else 1
        self.data_sources.append(DataSegment(flags, description, next_step, next_step - 1, files))

    def save_at(self, path: str | Path, step: int) -> None:
        """Save the record of a checkpoint at optimizer step `step`, its current data segment ending there."""
        self.end_at(step)
        self.save(path)

    def end_at(self, step: int) -> None:
        """Training has reached optimizer step `step`: the current segment ends there (and is dropped if empty)."""
        if not self.data_sources:
            return
        self.data_sources[-1].last_step = step
        if step < self.data_sources[-1].first_step:
            self.data_sources.pop()


def resume_arguments(checkpoint: str, given: dict[str, Any]) -> tuple[dict[str, Any], RunRecord, list[str]]:
    """The arguments of a resumed run: `given`, then the checkpoint run's recorded ones, then its output folder.

    Returns them, the record to continue and the names taken from the run. A checkpoint without a record (written
    by another script or an older version) continues with `given` alone: its data flags, taken as the run's, or
    `resume_with_new_data`, which leaves the steps so far to unrecorded data. Raises `ValueError` for a folder
    that is not a `checkpoint-<step>` folder, and when `given` names a data source other than the run's, or none
    for a checkpoint without a record, without `resume_with_new_data`.
    """
    step = checkpoint_step(checkpoint)
    if step is None:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} is not a {PREFIX_CHECKPOINT_DIR}-<step> folder of a run; to "
            "continue training a finished model, pass it as --model_name_or_path with a new --output_dir."
        )
    path = Path(checkpoint, RUN_RECORD_FILE)
    saved = RunRecord.load(path) if path.is_file() else RunRecord()
    if not path.is_file():
        if given.get("resume_with_new_data"):
            saved.data_sources = [DataSegment({}, UNRECORDED_DATA, 1, step)]
        elif not any(name in given for name in DATA_SOURCE_FIELDS):
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint} holds no {RUN_RECORD_FILE}, so it does not record the data "
                "its run read; give the run's data flags again (--train_file, --validation_file, --dataset_name, "
                "--dataset_config_name), or pass --resume_with_new_data to train on the embedded corpus "
                f"{EMBEDDED_CORPUS_NAME!r} from here on."
            )
    arguments = dict(saved.arguments)
    if any(name in given for name in DATA_SOURCE_FIELDS):
        replaced = FILE_SOURCE_FIELDS if any(name in given for name in HUB_SOURCE_FIELDS) else ()
        replaced += HUB_SOURCE_FIELDS if any(name in given for name in FILE_SOURCE_FIELDS) else ()
        new_flags = {
            name: given.get(name, None if name in replaced else saved.arguments.get(name))
            for name in DATA_SOURCE_FIELDS
        }
        if path.is_file() and new_flags != saved.source_flags() and not given.get("resume_with_new_data"):
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint} comes from a run on {describe_source(saved.source_flags())}, "
                f"but this run would read {describe_source(new_flags)}; leave the data flags out to resume on the "
                "run's data, or pass --resume_with_new_data to switch on purpose."
            )
        arguments.update(new_flags)
    restored = sorted(name for name in saved.arguments if name not in given)
    arguments.update(given)
    if "output_dir" not in given:
        arguments["output_dir"] = os.path.dirname(os.path.normpath(checkpoint)) or "."
    return arguments, RunRecord(recordable(arguments), saved.data_sources), restored
