import re
from pathlib import Path

import pytest


DOC = Path(__file__).resolve().parents[1] / "docs" / "fine_tuning.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_page_has_its_examples():
    assert len(BLOCKS) == 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs_as_written(index, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "__main__"})
