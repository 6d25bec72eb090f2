"""Every ```python block of the README, the docs pages and the metric card runs as written.

Each block runs on its own: in a fresh namespace and an empty working folder, so a block that leans on an import, a
variable or a file of another block fails here as it would for a reader who copies it alone. What cannot run on a
CPU test machine (multi-GPU launches, downloads, long trainings) belongs in ```bash blocks or prose.
"""

import re
import traceback
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState


ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "src" / "hf_lossfree_moe" / "metrics").glob("*/README.md")),
]
# A fenced block, possibly indented (inside a list item); group 2 is its code, still indented.
PYTHON_BLOCK = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list:
    blocks = []
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        for match in PYTHON_BLOCK.finditer(text):
            indent = match.group(1)
            code = "".join(line.removeprefix(indent) for line in match.group(2).splitlines(keepends=True))
            first_line = text.count("\n", 0, match.start(2)) + 1
            name = f"{path.relative_to(ROOT)}:{first_line}"
            blocks.append(pytest.param(path, first_line, code, id=name))
    return blocks


@pytest.fixture
def fresh_accelerate_state():
    """`Accelerator` keeps process-wide state (gradient accumulation, mixed precision): each block starts clean."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_documents_hold_python_blocks():
    names = {path.name for path, _, _ in (param.values for param in python_blocks())}
    assert "README.md" in names  # the pattern still finds the README's blocks


@pytest.mark.parametrize(("path", "first_line", "code"), python_blocks())
def test_python_block_runs_as_written(
    path, first_line, code, tmp_path, monkeypatch, one_thread, fresh_accelerate_state
):
    monkeypatch.chdir(tmp_path)
    # Compiled under the document's name with its line numbers, so a traceback points into the document.
    compiled = compile("\n" * (first_line - 1) + code, str(path), "exec")
    try:
        exec(compiled, {"__name__": "__main__"})
    except Exception as error:
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == str(path)]
        line = frames[-1].lineno if frames else first_line
        pytest.fail(
            f"{path.relative_to(ROOT)}:{line} (the ```python block starting at line {first_line}) raised "
            f"{type(error).__name__}: {error}",
            pytrace=False,
        )


def test_readme_trainer_example_trains_on_real_text_with_a_tokenizer():
    """The front page's first example is what a user adapts: text and a tokenizer, not random token ids."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## With `Trainer`") :].split("\n## ")[0]
    (code,) = [match.group(2) for match in PYTHON_BLOCK.finditer(section)]
    assert "randint" not in code and "tokenizer = " in code and "processing_class=tokenizer" in code


def test_training_page_says_how_far_its_result_figures_reproduce():
    """The figures of `make train` differ between machines: the page says so, and what does reproduce."""
    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    printed = re.search(r"eval_maxvio_global:\s+([0-9.]+)", page).group(1)
    after = page[page.index(printed) :]
    explanation = after[after.index("```\n") : after.index("![")]
    assert "another machine prints others" in explanation and "deterministic" in explanation
