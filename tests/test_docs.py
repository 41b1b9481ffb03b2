"""The README is the one documented place for settings and the two commands: keep it true."""

from __future__ import annotations

from launch.settings_doc import render
from shared.config import PROJECT_ROOT, Settings


def readme() -> str:
    return (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")


def test_the_configuration_table_matches_the_settings() -> None:
    text = readme()
    assert render(text) == text, "run `python -m launch.settings_doc --write`"
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in text


def test_the_two_commands_come_first() -> None:
    text = readme()
    first_block = text[: text.index("## How it works")]
    assert "make up" in first_block and "make test" in first_block
