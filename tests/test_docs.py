"""The README is the one documented place for settings and the two commands: keep it true."""

from __future__ import annotations

import itertools
import re

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


def test_the_architecture_doc_names_files_that_exist() -> None:
    """docs/architecture.md walks a job through the code file by file: every path it names exists."""
    import re

    text = (PROJECT_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:api|worker|shared|launch|bench|client|artifacts)/[\w/]+(?:\.py)?)`", text))
    assert len(named) > 20
    missing = sorted(path for path in named if not (PROJECT_ROOT / path).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_nothing_points_to_an_outside_design_document() -> None:
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "Makefile", "Procfile"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    offenders = [
        path
        for path in tracked
        if (PROJECT_ROOT / path).exists()
        and re.search(r"DESIGN\s*§?\d", (PROJECT_ROOT / path).read_text(errors="replace"))
    ]
    assert not offenders, offenders


def test_the_readme_states_the_embedded_servers_maxmemory() -> None:
    """What the Redis section says `make up`'s server runs with is EMBEDDED_REDIS_MAXMEMORY's default."""
    text = readme()
    section = text[text.index("\n## Redis\n") :]
    section = section[: section.index("\n## ", 1)]
    (bullet,) = [b for b in section.split("\n- ") if b.startswith("The embedded server of `make up`")]
    default = Settings.model_fields["embedded_redis_maxmemory"].default
    assert default and f"{default} by" in bullet and "`EMBEDDED_REDIS_MAXMEMORY`" in bullet, bullet
    assert "no `maxmemory`" not in bullet, bullet


def test_no_readme_line_is_a_stray_fragment() -> None:
    """A line that starts in lower case continues the sentence of the line before it: never one
    that the line before has already ended (what an edit that splits a sentence leaves behind)."""
    lines = readme().splitlines()
    in_code = False
    strays = []
    for before, line in itertools.pairwise(lines):
        if before.startswith("```"):
            in_code = not in_code
        ended = re.search(r"[.!?]\)?$", before.rstrip()) and not re.search(r"\b(e\.g|i\.e|etc)\.$", before)
        if not in_code and ended and re.match(r"\s+[a-z]", line):
            strays.append(f"{before.strip()[-50:]!r} then {line.strip()[:50]!r}")
    assert not strays, strays
