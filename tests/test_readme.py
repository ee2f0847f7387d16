"""README's python examples run as written, and its install/test commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_ci_runs_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [c for c in re.findall(r"```bash\n(.*?)```", readme, re.S)][:2]  # install, test
    for block in commands:
        for line in block.strip().splitlines():
            assert line in ci, f"README command not run by CI: {line}"
