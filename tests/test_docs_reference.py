"""The reference facts of the docs are the code's: config fields and defaults, signatures, argument names, tests.

docs/configuration.md is kept by scripts/config_table.py; signatures shown in a plain ``` block, keyword arguments
written in prose, and the tests the pitfall tables name are compared with the live code.
"""

import ast
import inspect
import re
from dataclasses import fields
from importlib.metadata import distribution
from pathlib import Path

import pytest

import hf_lossfree_moe
from hf_lossfree_moe.settings import ALIASES, BalancingSettings
from hf_lossfree_moe_scripts import config_table


ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGURATION_PAGE = ROOT / "docs" / "configuration.md"
# The public callables whose arguments the docs spell out.
DOCUMENTED_CALLABLES = {
    "BalancingSettings": hf_lossfree_moe.BalancingSettings,
    "LossFreeBalancer": hf_lossfree_moe.LossFreeBalancer,
    "LossFreeBalancingCallback": hf_lossfree_moe.LossFreeBalancingCallback,
    "add_balancing_callback": hf_lossfree_moe.add_balancing_callback,
    "export_to_glm4_moe": hf_lossfree_moe.export_to_glm4_moe,
    "measure": hf_lossfree_moe.LossFreeBalancer.measure,
}
# A fenced block without a language whose first line opens a documented call: a signature.
SIGNATURE_BLOCK = re.compile(r"^```\n((\w+)\(.*?\))\n```$", re.MULTILINE | re.DOTALL)
CALL = re.compile(r"\b(" + "|".join(DOCUMENTED_CALLABLES) + r")\(")
TEST_REFERENCE = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def documents_text() -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8") for path in DOCUMENTS}


def table_rows(text: str) -> dict[str, str]:
    """The default cell of each field row of the page's field tables."""
    rows = {}
    for line in text.splitlines():
        cells = config_table.split_row(line) if line.startswith("| `") else []
        if cells and config_table.FIELD_CELL.match(cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_configuration_page_is_what_config_table_writes():
    """Run `python scripts/config_table.py` after changing a field of LossFreeMoeConfig."""
    text = CONFIGURATION_PAGE.read_text(encoding="utf-8")
    assert config_table.update_page(text) == text


def test_every_config_field_has_one_row_with_the_class_default():
    rows = table_rows(CONFIGURATION_PAGE.read_text(encoding="utf-8"))
    defaults = config_table.config_defaults()
    assert sorted(rows) == sorted(defaults)
    assert rows["bias_update_rate"] == "`1e-3`" and rows["scoring_func"] == '`"sigmoid"`'
    assert {name: rows[name] for name in defaults} == {
        name: config_table.format_default(value) for name, value in defaults.items()
    }


def test_config_table_fixes_a_wrong_default_and_adds_a_missing_field():
    text = CONFIGURATION_PAGE.read_text(encoding="utf-8")
    broken = text.replace("| `bias_update_rate` | `1e-3` |", "| `bias_update_rate` | `1e-2` |")
    broken = re.sub(r"^\| `bias_update_momentum` \|.*\n", "", broken, flags=re.MULTILINE)
    assert table_rows(broken).keys() == table_rows(text).keys() - {"bias_update_momentum"}
    fixed = table_rows(config_table.update_page(broken))
    assert fixed["bias_update_rate"] == "`1e-3`" and fixed["bias_update_momentum"] == "`0.9`"
    assert 'Momentum mu of the `"smebu"` rule' in config_table.update_page(broken)


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e-3, "`1e-3`"), (1e-6, "`1e-6`"), (2.5e-4, "`2.5e-4`"), (0.02, "`0.02`"), (1.0, "`1.0`"), (0.0, "`0.0`")]
    + [(32000, "`32000`"), ("silu", '`"silu"`'), (False, "`False`"), (None, "`None`")],
)
def test_defaults_are_written_as_a_reader_types_them(value, text):
    assert config_table.format_default(value) == text


def documented_signatures() -> list:
    found = []
    for name, text in documents_text().items():
        for match in SIGNATURE_BLOCK.finditer(text):
            found.append(pytest.param(match.group(2), match.group(1), id=f"{name}:{match.group(2)}"))
    return found


def test_the_docs_show_the_balancer_and_callback_signatures():
    shown = {name for name, _ in (param.values for param in documented_signatures())}
    assert {"BalancingSettings", "LossFreeBalancer", "LossFreeBalancingCallback"} <= shown


@pytest.mark.parametrize(("name", "shown"), documented_signatures())
def test_documented_signature_is_the_code_signature(name, shown):
    assert name in DOCUMENTED_CALLABLES, f"{name} is shown as a signature but is not a documented callable"
    node = ast.parse(f"def {shown}: pass").body[0].args
    positional = [*node.posonlyargs, *node.args]
    documented = [arg.arg for arg in positional] + ([node.vararg.arg] if node.vararg else [])
    documented += [arg.arg for arg in node.kwonlyargs]
    documented += [node.kwarg.arg] if node.kwarg else []
    with_defaults = positional[len(positional) - len(node.defaults) :]
    defaults = {arg.arg: default for arg, default in zip(with_defaults, node.defaults, strict=True)}
    defaults.update(
        {arg.arg: default for arg, default in zip(node.kwonlyargs, node.kw_defaults, strict=True) if default}
    )
    live = [p for p in inspect.signature(DOCUMENTED_CALLABLES[name]).parameters.values() if p.name != "self"]
    assert documented == [p.name for p in live]
    assert [arg.arg for arg in node.kwonlyargs] == [p.name for p in live if p.kind is p.KEYWORD_ONLY]
    assert {name: ast.unparse(value) for name, value in defaults.items()} == {
        p.name: repr(p.default) for p in live if p.default is not p.empty
    }


def call_keywords(text: str, start: int) -> list[str]:
    """The keywords of the call whose arguments begin at `text[start]`, nested calls left out."""
    keywords, depth, argument = [], 0, ""
    for character in text[start:]:
        if depth == 0 and character in ",)":
            keyword = re.match(r"\s*(\w+)=(?!=)", argument)
            keywords += [keyword.group(1)] if keyword else []
            if character == ")":
                return keywords
            argument = ""
            continue
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(character, 0)
        argument += character
    return keywords


def test_call_keywords_leave_out_nested_calls():
    text = "add_balancing_callback(trainer, callback=LossFreeBalancingCallback(update_rate=1e-2), x={'a': 1})"
    assert call_keywords(text, text.index("(") + 1) == ["callback", "x"]


def test_every_keyword_the_docs_pass_is_a_parameter():
    """`LossFreeBalancer(model, total_steps=...)` in prose must name arguments the code takes, the settings by their
    current names: the earlier ones (`update_rate`, `rule`, ...) still work, and only the table of them names them."""
    unknown, checked = [], 0
    for document, text in documents_text().items():
        for call in CALL.finditer(text):
            parameters = set(inspect.signature(DOCUMENTED_CALLABLES[call.group(1)]).parameters)
            if "overrides" in parameters:  # the balancer's and the callback's settings, by keyword
                parameters |= {field.name for field in fields(BalancingSettings)}
            keywords = call_keywords(text, call.end())
            checked += len(keywords)
            unknown += [
                f"{document}: {call.group(1)}({keyword}=...)" for keyword in keywords if keyword not in parameters
            ]
    assert checked > 10 and unknown == []


def test_every_test_the_docs_name_exists():
    named = [
        (document, match.group(1), match.group(2))
        for document, text in documents_text().items()
        for match in TEST_REFERENCE.finditer(text)
    ]
    assert len(named) > 20  # the pitfall tables
    missing = []
    for document, file, test in named:
        path = ROOT / "tests" / file
        if not path.is_file() or not re.search(rf"^def {test}\(", path.read_text(encoding="utf-8"), re.MULTILINE):
            missing.append(f"{document}: {file}::{test}")
    assert missing == []


def test_the_readme_names_every_command_and_its_script():
    commands = distribution("hf-lossfree-moe").entry_points.select(group="console_scripts")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(commands) == 5
    for command in commands:
        script = command.value.removeprefix("hf_lossfree_moe_scripts.").removesuffix(":main")
        assert f"| `{command.name}` | `scripts/{script}.py` |" in readme


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_local_link_and_named_file_exists():
    """Links between pages (with their #anchors) and the files the prose names in backticks."""
    broken = []
    for document, text in documents_text().items():
        folder = (ROOT / document).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            page = (folder / path).resolve() if path else ROOT / document
            if not page.exists() or (anchor and anchor not in anchors(page.read_text(encoding="utf-8"))):
                broken.append(f"{document}: {target}")
        for named in re.findall(r"`((?:src|scripts|tests|docs|model_cards|hf_lossfree_moe)/[\w/.-]+)`", text):
            if not any(path.exists() for path in (ROOT / named, ROOT / "src" / named)):
                broken.append(f"{document}: {named}")
    assert broken == []


def test_the_table_of_earlier_keywords_maps_each_to_its_setting():
    text = (ROOT / "docs" / "balancing.md").read_text(encoding="utf-8")
    table = text[text.index("| earlier keyword |") :].split("\n\n")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|$", table, re.MULTILINE))
    assert rows == ALIASES
