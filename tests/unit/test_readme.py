"""The README documents every recipe field and every CLI command (no drift)."""

from pathlib import Path

from edgeft.cli import cli
from edgeft.recipe import recipe_reference

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_has_the_current_recipe_reference():
    assert recipe_reference() in README


def test_readme_names_every_command_and_the_two_setup_commands():
    for name in cli.commands:
        assert f"edgeft {name}" in README
    assert "make demo" in README and "make test" in README
