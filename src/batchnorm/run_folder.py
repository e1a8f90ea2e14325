"""Output folders the CLI writes into without ever losing a file it did not write.

A command (``demo``, ``bench``) stages its files in a hidden folder inside the
output folder and moves them into place only once the run is complete. It then
records what it wrote, with each file's SHA-256, in a manifest
(``batchnorm-<command>-manifest.json``). A later run into the same folder
replaces or removes only files listed there and still unchanged; anything else
in the folder is left alone, and a name the run needs that is taken by a file
it did not write (or by one edited since) stops the run before any work, with
one line that says which file and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["RunFolder"]

_MANIFEST_FORMAT = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunFolder:
    """The output folder ``out`` of one ``command``.

    Use: :meth:`check` the names the run may write (before any work), write
    them into :meth:`stage`, then :meth:`publish`; :meth:`discard` on failure.
    """

    def __init__(self, out: str | os.PathLike, command: str):
        self.out = Path(out).expanduser()
        self.command = command
        self.manifest = self.out / f"batchnorm-{command}-manifest.json"
        self._staging: Path | None = None
        self._created = False

    # --- what an earlier run wrote ---------------------------------------------

    def _recorded(self) -> dict[str, str]:
        """``{file name: sha256}`` of the files an earlier run recorded (empty when none)."""
        if not self.manifest.exists():
            return {}
        try:
            data = json.loads(self.manifest.read_text())
            files = data["files"]
            if data.get("command") != self.command or not isinstance(files, dict):
                raise ValueError
            return {str(name): str(digest) for name, digest in files.items()}
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(
                f"{self.manifest} is not a manifest written by batchnorm {self.command}; "
                "move it or choose another --out"
            ) from None

    def _ours(self, name: str, recorded: dict[str, str]) -> bool:
        """Whether ``out/name`` is a file an earlier run wrote and nobody has changed since."""
        path = self.out / name
        return name in recorded and path.is_file() and not path.is_symlink() and _sha256(path) == recorded[name]

    def check(self, names: Iterable[str]) -> None:
        """Raise ``ValueError`` unless the run may write every one of ``names`` into the folder."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output path {self.out} exists and is not a folder")
        if not self.out.exists():
            return
        recorded = self._recorded()  # raises unless the manifest there is ours
        for name in names:
            if name == self.manifest.name:
                continue
            path = self.out / name
            if (path.exists() or path.is_symlink()) and not self._ours(name, recorded):
                why = "was changed since" if name in recorded else "was not written by"
                raise ValueError(
                    f"{path} {why} an earlier batchnorm {self.command} run; "
                    "move it or choose another --out (nothing was written)"
                )

    # --- writing a run -----------------------------------------------------------

    def stage(self) -> Path:
        """A new hidden folder inside the output folder for this run's files."""
        try:
            if not self.out.exists():
                self.out.mkdir(parents=True)
                self._created = True
            self._staging = Path(tempfile.mkdtemp(prefix=f".batchnorm-{self.command}-", dir=self.out))
        except OSError as error:
            self.discard()
            raise ValueError(f"cannot write output folder {self.out}: {error.strerror or error}") from None
        return self._staging

    def publish(self) -> list[str]:
        """Move the staged files into place and record them; returns their names.

        Files of the earlier run that this run did not write again are removed
        (when unchanged); every other file in the folder is left as it was.
        """
        if self._staging is None:
            raise RuntimeError("nothing staged")
        names = sorted(p.name for p in self._staging.iterdir())
        self.check([*names, self.manifest.name])  # again: the folder may have changed during the run
        recorded = self._recorded()
        files = {name: _sha256(self._staging / name) for name in names}
        for name in names:
            os.replace(self._staging / name, self.out / name)
        for name in recorded:
            if name not in files and self._ours(name, recorded):
                (self.out / name).unlink()
        manifest = {"format": _MANIFEST_FORMAT, "command": self.command, "files": files}
        partial = self._staging / self.manifest.name
        partial.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(partial, self.manifest)
        self._staging.rmdir()
        self._staging = None
        return names

    def discard(self) -> None:
        """Remove the staged files (and the output folder, if this run made it and it is empty)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self._created:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only when empty
            self._created = False
