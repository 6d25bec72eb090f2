"""docs/support_table.md lists every MoE family of the installed transformers, with the status its checks give."""

import re
from pathlib import Path

import pytest
import transformers

from hf_lossfree_moe.testing_utils import correction_bias_families, moe_families
from hf_lossfree_moe_scripts import support_table


TABLE = Path(__file__).resolve().parents[1] / "docs" / "support_table.md"
ROW = re.compile(r"^\| `(\w+)` \|.*\| ([^|]+) \|$", re.MULTILINE)


def committed_rows() -> dict[str, str]:
    return {match.group(1): match.group(0) for match in ROW.finditer(TABLE.read_text(encoding="utf-8"))}


def committed_statuses() -> dict[str, str]:
    return {match.group(1): match.group(2) for match in ROW.finditer(TABLE.read_text(encoding="utf-8"))}


def test_the_table_lists_every_moe_family_of_this_transformers_once():
    text = TABLE.read_text(encoding="utf-8")
    assert f"transformers {transformers.__version__} ({len(moe_families())})" in text
    assert [match.group(1) for match in ROW.finditer(text)] == list(moe_families())


def test_every_status_is_one_of_four_and_no_check_failed():
    statuses = committed_statuses()
    allowed = ("balanced with its own bias", "measure-only", "measure-only; opt-in bias", "unsupported: ")
    assert all(status == allowed[0] or status.startswith(allowed[1:]) for status in statuses.values()), statuses
    assert not any("check failed" in status for status in statuses.values())
    assert all(statuses[family] == "balanced with its own bias" for family in correction_bias_families())
    for family in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"):
        assert statuses[family] == "measure-only; opt-in bias"


@pytest.mark.parametrize("family", ["qwen3_moe", "granitemoe", "llama4", "deepseek_v3"])
def test_a_row_regenerated_now_matches_the_committed_one(family):
    assert support_table.row(family) == committed_rows()[family]


@pytest.mark.slow
def test_the_whole_table_regenerated_now_matches_the_committed_one():
    rows = [support_table.row(family) for family in moe_families()]
    assert support_table.render_table(rows) == TABLE.read_text(encoding="utf-8")
