"""The seed question's worked answer runs: examples/seed_question.py and the doc's code blocks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import fused_birnn.reference

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "seed_question.py"
DOC = REPO / "docs" / "how_pytorch_computes_birnn.md"


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def test_example_script_passes():
    # Let the subprocess import the same fused_birnn as this process, installed or not.
    package_root = str(Path(fused_birnn.reference.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: corrected decomposition output" in result.stdout
    assert "PASS: naive decomposition diverges at layer 2" in result.stdout
    assert "FAIL" not in result.stdout
    assert "PASS: fused_birnn.RNN output" in result.stdout, result.stdout


def test_doc_code_blocks_run():
    blocks = _python_blocks(DOC.read_text())
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "__doc_example__"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{DOC.name}[python block {i}]", "exec")
        exec(code, namespace)


def test_doc_embeds_the_example_script_verbatim():
    assert _python_blocks(DOC.read_text())[-1] == EXAMPLE.read_text()
