"""The README's compatibility table is the matrix's: every row a path the tests walk."""

from __future__ import annotations

from pathlib import Path

from tests.ecosystem.paths import OTHER_PATHS, compatibility_table

ROOT = Path(__file__).parents[2]


def test_readme_table_is_generated_from_the_matrix():
    readme = ROOT.joinpath("README.md").read_text()
    start = readme.index("<!-- compatibility table -->") + len("<!-- compatibility table -->")
    end = readme.index("<!-- end of compatibility table -->")
    assert readme[start:end].strip() == compatibility_table(), (
        "README.md's compatibility table differs from tests/ecosystem/paths.py; paste compatibility_table()"
    )


def test_paths_checked_on_their_own_name_existing_tests():
    for _, _, test in OTHER_PATHS:
        file, _, name = test.partition("::")
        source = ROOT.joinpath("tests", "ecosystem", file).read_text()
        assert not name or f"def {name}(" in source, test
