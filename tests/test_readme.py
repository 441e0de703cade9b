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


def test_ci_runs_exactly_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0].splitlines()
    assert ci in commands, "the last line of .ci/run must be the README's test command"
    assert "pytest" in ci and "sphinx -W" in ci, "CI runs the tests and the warning-free docs build"
