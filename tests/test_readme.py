"""The README's example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_example_runs():
    example = re.search(r"## Example\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert example is not None, "README.md has no Python example under '## Example'"
    namespace: dict = {}
    exec(compile(example.group(1), str(README), "exec"), namespace)
    assert namespace["policy_logps"].shape == (2,)
    assert namespace["lm_head"].weight.grad is not None
