"""The README's Python examples run as written."""

import pathlib
import re


README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


def test_readme_examples_run_in_sequence(capsys):
    namespace: dict = {}
    for block in BLOCKS:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["g"].shape == namespace["lam"].shape
    assert namespace["info"].ok
    assert "True" in capsys.readouterr().out
