"""The documentation keeps up with the code: every config key documented, every documented key real."""

import re
from pathlib import Path

from dfakd import config

ROOT = Path(__file__).resolve().parents[1]


def _keys(tree, prefix=""):
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in config._FREE_FORM:
            yield from _keys(value, f"{dotted}.")
        else:
            yield dotted


def test_every_config_key_is_documented_and_every_documented_key_exists():
    text = (ROOT / "docs" / "config.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", text, flags=re.M))
    actual = set(_keys(config.DEFAULTS))
    assert actual - documented == set(), "undocumented keys"
    assert documented - actual == set(), "documented keys that do not exist"


def test_readme_quick_start_commands_exist():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
