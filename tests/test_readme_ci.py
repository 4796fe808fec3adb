"""The README's install and test commands are exactly the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {title} -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert match, f"README has no '<!-- {title} -->' code block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands():
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    install, test = _readme_block("install"), _readme_block("test")
    assert len(install) == 1 and len(test) == 1, "one install command and one test command"
    assert "torch==2.13.0" in install[0], "the install command must pin torch"
    assert install[0] in ci_lines and test[0] in ci_lines
    assert ci_lines.index(install[0]) < ci_lines.index(test[0])


def test_readme_shows_the_main_job():
    assert _readme_block("main job") == ["shotdistill run recipes/tiny.yaml"]
