"""Run folders: a run replaces only files an earlier run of the same command wrote and nobody changed."""

from __future__ import annotations

import json

import pytest

from batchnorm.run_folder import RunFolder


def write_run(out, files: dict[str, str], command: str = "demo") -> RunFolder:
    folder = RunFolder(out, command)
    folder.check(files)
    staged = folder.stage()
    for name, text in files.items():
        (staged / name).write_text(text)
    assert folder.publish() == sorted(files)
    return folder


def test_first_run_creates_the_folder_and_records_what_it_wrote(tmp_path):
    folder = write_run(tmp_path / "a" / "run", {"x.txt": "1", "y.txt": "2"})
    manifest = json.loads(folder.manifest.read_text())
    assert manifest["command"] == "demo" and sorted(manifest["files"]) == ["x.txt", "y.txt"]
    assert sorted(p.name for p in folder.out.iterdir()) == ["batchnorm-demo-manifest.json", "x.txt", "y.txt"]


def test_second_run_replaces_and_removes_only_its_own_unchanged_files(tmp_path):
    write_run(tmp_path, {"x.txt": "1", "y.txt": "2"})
    (tmp_path / "mine.txt").write_text("keep")
    write_run(tmp_path, {"x.txt": "new"})
    assert (tmp_path / "x.txt").read_text() == "new" and not (tmp_path / "y.txt").exists()
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_a_changed_file_of_an_earlier_run_is_kept_and_stops_the_run(tmp_path):
    write_run(tmp_path, {"x.txt": "1", "y.txt": "2"})
    (tmp_path / "y.txt").write_text("edited")
    with pytest.raises(ValueError, match=r"y\.txt was changed since an earlier batchnorm demo run"):
        write_run(tmp_path, {"y.txt": "3"})
    # not a name of the new run: left in place although the manifest lists it
    write_run(tmp_path, {"x.txt": "3"})
    assert (tmp_path / "y.txt").read_text() == "edited"


def test_other_commands_files_are_foreign(tmp_path):
    write_run(tmp_path, {"results.md": "bench"}, command="bench")
    with pytest.raises(ValueError, match=r"results\.md was not written by an earlier batchnorm demo run"):
        RunFolder(tmp_path, "demo").check(["results.md"])


def test_a_file_that_appears_during_the_run_is_not_overwritten(tmp_path):
    folder = RunFolder(tmp_path, "demo")
    folder.check(["x.txt"])
    (folder.stage() / "x.txt").write_text("ours")
    (tmp_path / "x.txt").write_text("someone else's")
    with pytest.raises(ValueError, match=r"x\.txt was not written by"):
        folder.publish()
    folder.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
    assert (tmp_path / "x.txt").read_text() == "someone else's"


def test_symlinks_folders_and_foreign_manifests_are_never_ours(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").symlink_to(target)
    (out / "y.txt").mkdir()
    for name in ("x.txt", "y.txt"):
        with pytest.raises(ValueError, match=f"{name} was not written by"):
            RunFolder(out, "demo").check([name])
    (out / "batchnorm-demo-manifest.json").write_text("not json")
    with pytest.raises(ValueError, match="is not a manifest written by batchnorm demo"):
        RunFolder(out, "demo").check(["z.txt"])
    assert target.read_text() == "precious"


def test_discard_removes_a_folder_it_made_and_nothing_else(tmp_path):
    folder = RunFolder(tmp_path / "new", "demo")
    folder.stage()
    folder.discard()
    assert not (tmp_path / "new").exists()
    kept = RunFolder(tmp_path, "demo")
    kept.stage()
    kept.discard()
    assert tmp_path.exists() and list(tmp_path.iterdir()) == []


def test_a_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        RunFolder(tmp_path / "f", "demo").check(["a"])
