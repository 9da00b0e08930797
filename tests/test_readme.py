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


def test_readme_preference_losses_example_runs():
    section = README.read_text().partition("\n## Preference losses\n")[2]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example is not None, "README.md has no Python example under '## Preference losses'"
    namespace: dict = {}
    exec(compile(example.group(1), str(README), "exec"), namespace)
    assert namespace["policy_logits"].grad is not None and namespace["kto_logits"].grad is not None
    assert {"rewards/accuracies", "logits/chosen", "entropy"} <= set(namespace["metrics"])
    assert namespace["kto_metrics"]["kl"].shape == ()
    assert namespace["output"].losses.shape == (3,) and "rewards/margins" in namespace["ipo_metrics"]
    assert namespace["found"] == []


def test_readme_hidden_state_example_runs():
    example = re.search(r"## Log-probs from hidden states.*?```python\n(.*?)```", README.read_text(), re.S)
    assert example is not None, "README.md has no Python example under '## Log-probs from hidden states'"
    namespace: dict = {}
    exec(compile(example.group(1), str(README), "exec"), namespace)
    assert namespace["lm_head"].weight.grad is not None and namespace["hidden"].grad is not None


def test_readme_transformers_example_runs():
    section = README.read_text().partition("\n## In TRL and Transformers\n")[2]
    examples = re.findall(r"```python\n(.*?)```", section.partition("\n## ")[0], re.S)
    assert len(examples) == 2, "README.md's TRL and Transformers section has two Python examples"
    namespace: dict = {}
    exec(compile(examples[1], str(README), "exec"), namespace)
    assert namespace["stats"].logps.shape == (2, 15)
    assert namespace["model"].lm_head.weight.grad is not None
