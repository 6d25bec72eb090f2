#!/usr/bin/env python
"""Keep the field tables of docs/configuration.md true to `LossFreeMoeConfig`: one row per field, its default read
from the class.

The page groups the fields in tables whose first two columns are `field` and `default`; the other columns (why a
default is what it is) are written by hand. This script rewrites every default cell from the class, drops the row of a
field the class no longer has, and appends a field the page lacks to the page's last table, described by the class
docstring, to be moved where it belongs. tests/test_docs_reference.py fails when the committed page differs from what
this script writes.

    python scripts/config_table.py                                   # updates docs/configuration.md
    python scripts/config_table.py --page /tmp/configuration.md      # another copy of the page
"""

import re
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_lossfree_moe import LossFreeMoeConfig


HEADER = re.compile(r"^\| field \| default \|")
FIELD_CELL = re.compile(r"^`(\w+)`$")
# One entry of the docstring's Args: `name (`type`, ...): text`, or several names sharing one entry.
DOCSTRING_ENTRY = re.compile(r"^ {8}(\w+(?:, \w+)*) \(.*?\): (.*)$")


@dataclass
class TableArguments:
    page: str = field(default="docs/configuration.md", metadata={"help": "The Markdown page to update in place."})


def config_defaults() -> dict[str, object]:
    """Every field `LossFreeMoeConfig` declares itself (not those it inherits), in declaration order, with its
    default."""
    declared = vars(LossFreeMoeConfig)["__annotations__"]
    defaults = {}
    for name in declared:
        default = LossFreeMoeConfig.__dataclass_fields__[name].default
        if default is MISSING:
            raise ValueError(f"LossFreeMoeConfig.{name} has no default to document.")
        defaults[name] = default
    return defaults


def format_default(value: object) -> str:
    """The default as a reader would type it, in a code span: `1e-3`, `0.9`, `"sigmoid"`, `None`."""
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    elif isinstance(value, str):
        text = f'"{value}"'
    else:
        text = repr(value)
    return f"`{text}`"


def docstring_descriptions() -> dict[str, str]:
    """Each field's text in the Args section of the class docstring, continuation lines joined."""
    descriptions, names = {}, []
    for line in LossFreeMoeConfig.__doc__.splitlines():
        entry = DOCSTRING_ENTRY.match(line)
        if entry:
            names = entry.group(1).split(", ")
            descriptions.update(dict.fromkeys(names, entry.group(2).strip()))
        elif names and line.startswith(" " * 12):
            descriptions.update({name: f"{descriptions[name]} {line.strip()}" for name in names})
        else:
            names = []
    return descriptions


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (no cell of these tables holds a `|`)."""
    return [cell.strip() for cell in line.strip().removeprefix("|").removesuffix("|").split("|")]


def join_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def update_page(text: str) -> str:
    """`text` with every field table's default cells taken from the class, rows of removed fields dropped and
    missing fields appended to the last table."""
    defaults = config_defaults()
    lines = text.split("\n")
    output, documented, last_table_end, columns = [], set(), None, 0
    index = 0
    while index < len(lines):
        line = lines[index]
        output.append(line)
        index += 1
        if not HEADER.match(line):
            continue
        columns = len(split_row(line))
        output.append(lines[index])  # the |---| separator
        index += 1
        while index < len(lines) and lines[index].startswith("|"):
            cells = split_row(lines[index])
            index += 1
            name = FIELD_CELL.match(cells[0])
            if name is None or len(cells) != columns:
                raise ValueError(f"A row of a field table must name one field and have {columns} cells: {cells}")
            name = name.group(1)
            if name in documented:
                raise ValueError(f"{name} has two rows; state each field once.")
            if name in defaults:
                documented.add(name)
                output.append(join_row([cells[0], format_default(defaults[name]), *cells[2:]]))
        last_table_end = len(output)
    if last_table_end is None:
        raise ValueError("The page holds no table whose columns start with `field` and `default`.")
    descriptions = docstring_descriptions()
    missing = [
        join_row([f"`{name}`", format_default(default), descriptions.get(name, ""), *[""] * (columns - 3)])
        for name, default in defaults.items()
        if name not in documented
    ]
    output[last_table_end:last_table_end] = missing
    return "\n".join(output)


def main(argv: list[str] | None = None):
    (args,) = HfArgumentParser(TableArguments).parse_args_into_dataclasses(argv)
    page = Path(args.page)
    page.write_text(update_page(page.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"updated {page}")


if __name__ == "__main__":
    main()
