"""`echo-megatron patch-megatron`: apply, check or revert our fixes to the installed megatron-core.

The fixes are unified diffs in the repository's top-level `patches/` (one `.patch` per bug, each with
a `.md` note: the bug, a reproduction, upstream status). They are written against megatron-core
`MEGATRON_CORE_VERSION` exactly, with paths `megatron/core/...` relative to the directory that holds
the `megatron` package (so `patch -p1 -d <that directory> < FILE.patch` applies one by hand too).

The installed megatron-core is the one `import megatron.core` would load (its location is found with
`importlib.util.find_spec`, without importing it). Applying is idempotent and all-or-nothing: every
hunk of every patch is checked against the files before any file is written, a patch already applied
is left alone, and a file that matches neither the original nor the patched text is an error that
names it. Other megatron-core versions are refused.

Nothing in echo-megatron requires a patched Megatron: code that benefits from a fix asks
`patch_applied(name)` and otherwise keeps its workaround.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MEGATRON_CORE_VERSION = "0.19.2"
PATCH_DIR = Path(__file__).resolve().parent / "patches"  # a link to the repository's top-level patches/
_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(RuntimeError):
    """A patch cannot be applied, checked or reverted (wrong version, modified file, no permission)."""


@dataclass(frozen=True)
class Hunk:
    """Lines `old` at 1-based line `old_start` become `new` (at `new_start` in the patched file)."""

    old_start: int
    new_start: int
    old: tuple[str, ...]
    new: tuple[str, ...]

    def reversed(self) -> Hunk:
        return Hunk(self.new_start, self.old_start, self.new, self.old)


@dataclass(frozen=True)
class FilePatch:
    path: str
    """Relative to the directory holding the `megatron` package, e.g. `megatron/core/ssm/mamba_mixer.py`."""
    hunks: tuple[Hunk, ...]

    def reversed(self) -> FilePatch:
        return FilePatch(self.path, tuple(h.reversed() for h in self.hunks))


@dataclass(frozen=True)
class Patch:
    name: str
    files: tuple[FilePatch, ...]


def parse_patch(name: str, text: str) -> Patch:
    """A unified diff (`--- a/PATH`, `+++ b/PATH`, `@@` hunks) -> `Patch`; only `megatron/core/` paths."""
    files: list[FilePatch] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        if not lines[i].startswith("--- "):
            i += 1
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise PatchError(f"{name}: '---' line {i + 1} is not followed by a '+++' line")
        path = lines[i + 1][4:].split("\t")[0].strip()
        path = path[2:] if path.startswith("b/") else path
        if not path.startswith("megatron/core/") or ".." in Path(path).parts:
            raise PatchError(f"{name}: patches may only touch megatron/core/, got {path!r}")
        i += 2
        hunks = []
        while i < len(lines) and lines[i].startswith("@@"):
            match = _HUNK_HEADER.match(lines[i])
            if not match:
                raise PatchError(f"{name}: malformed hunk header at line {i + 1}: {lines[i].rstrip()}")
            old_count = int(match.group(2) or 1)
            new_count = int(match.group(4) or 1)
            old: list[str] = []
            new: list[str] = []
            i += 1
            while i < len(lines) and (len(old) < old_count or len(new) < new_count):
                tag, body = lines[i][:1], lines[i][1:]
                if tag in (" ", "-"):
                    old.append(body)
                if tag in (" ", "+"):
                    new.append(body)
                if tag not in (" ", "-", "+", "\\"):
                    raise PatchError(f"{name}: unexpected line {i + 1} in a hunk: {lines[i].rstrip()}")
                i += 1
            if (len(old), len(new)) != (old_count, new_count):
                raise PatchError(f"{name}: truncated hunk for {path}")
            hunks.append(Hunk(int(match.group(1)), int(match.group(3)), tuple(old), tuple(new)))
        if not hunks:
            raise PatchError(f"{name}: no hunks for {path}")
        files.append(FilePatch(path, tuple(hunks)))
    if not files:
        raise PatchError(f"{name}: not a unified diff (no '---'/'+++' file headers)")
    return Patch(name, tuple(files))


def _find(lines: list[str], block: tuple[str, ...], expected: int, cursor: int) -> int | None:
    """Where `block` starts in `lines[cursor:]`: at `expected` if it matches there, else at its only
    exact occurrence (an offset, as `patch` allows; never fuzz); None if absent or ambiguous."""
    size = len(block)
    if expected >= cursor and tuple(lines[expected:expected + size]) == block:
        return expected
    starts = [i for i in range(cursor, len(lines) - size + 1) if tuple(lines[i:i + size]) == block]
    return starts[0] if len(starts) == 1 else None


def apply_hunks(lines: list[str], file_patch: FilePatch) -> list[str] | None:
    """`lines` with every hunk applied (exact context), or None if any hunk does not match."""
    out: list[str] = []
    cursor = 0
    for hunk in file_patch.hunks:
        if not hunk.old:
            raise PatchError(f"{file_patch.path}: hunks without context lines are not supported")
        start = _find(lines, hunk.old, hunk.old_start - 1, cursor)
        if start is None:
            return None
        out.extend(lines[cursor:start])
        out.extend(hunk.new)
        cursor = start + len(hunk.old)
    return out + lines[cursor:]


def available_patches() -> list[Patch]:
    """Every `*.patch` shipped with echo-megatron, sorted by name."""
    if not PATCH_DIR.is_dir():
        raise PatchError(f"patch directory {PATCH_DIR} is missing from this echo-megatron installation")
    return [parse_patch(path.stem, path.read_text()) for path in sorted(PATCH_DIR.glob("*.patch"))]


def megatron_root() -> Path:
    """The directory holding the `megatron` package that `import megatron.core` would load."""
    try:
        spec = importlib.util.find_spec("megatron.core")
    except ModuleNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        raise PatchError("megatron-core is not installed (no importable megatron.core)")
    return Path(spec.origin).resolve().parents[2]


def installed_version(root: Path) -> str:
    """megatron-core's `major.minor.patch[pre]` from `megatron/core/package_info.py` (not imported)."""
    info = root / "megatron" / "core" / "package_info.py"
    fields = {}
    for node in ast.parse(info.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE"):
                fields[node.targets[0].id] = ast.literal_eval(node.value)
    try:
        return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}{fields['PRE_RELEASE']}"
    except KeyError as missing:
        raise PatchError(f"cannot read megatron-core's version from {info} (no {missing})") from None


def _read_lines(root: Path, file_patch: FilePatch) -> list[str]:
    path = root / file_patch.path
    if not path.is_file():
        raise PatchError(f"{path} does not exist")
    return path.read_text().splitlines(keepends=True)


def status(patch: Patch, root: Path) -> str:
    """"applied", "not applied", or "modified" (some file matches neither the original nor the fix)."""
    states = set()
    for file_patch in patch.files:
        lines = _read_lines(root, file_patch)
        if apply_hunks(lines, file_patch.reversed()) is not None:
            states.add("applied")
        elif apply_hunks(lines, file_patch) is not None:
            states.add("not applied")
        else:
            states.add("modified")
    return states.pop() if len(states) == 1 else "modified"


def _write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_version(root: Path) -> None:
    version = installed_version(root)
    if version != MEGATRON_CORE_VERSION:
        raise PatchError(f"these patches are for megatron-core {MEGATRON_CORE_VERSION}; the installed one at "
                         f"{root / 'megatron' / 'core'} is {version}: refusing to patch it")


def run(action: str, patches: list[Patch] | None = None, root: Path | None = None) -> list[tuple[str, str]]:
    """`action` "check", "apply" or "revert" over `patches` (default: all shipped) of the megatron-core
    at `root` (default: the installed one). Returns [(patch name, what happened)].

    apply/revert write nothing unless every patch to change matches the files exactly.
    """
    if action not in ("check", "apply", "revert"):
        raise ValueError(f"action must be 'check', 'apply' or 'revert', got {action!r}")
    root = megatron_root() if root is None else root
    _check_version(root)
    patches = available_patches() if patches is None else patches
    states = {patch.name: status(patch, root) for patch in patches}
    if action == "check":
        return list(states.items())
    modified = [name for name, state in states.items() if state == "modified"]
    if modified:
        raise PatchError(f"{', '.join(modified)}: the megatron-core files differ from both the original "
                         f"{MEGATRON_CORE_VERSION} text and the patched text; nothing was changed")
    wanted, done = ("not applied", "applied") if action == "apply" else ("applied", "not applied")
    texts: dict[Path, list[str]] = {}
    report = []
    for patch in patches:
        if states[patch.name] != wanted:
            report.append((patch.name, f"already {done}"))
            continue
        for file_patch in patch.files:
            path = root / file_patch.path
            lines = texts[path] if path in texts else _read_lines(root, file_patch)
            changed = apply_hunks(lines, file_patch if action == "apply" else file_patch.reversed())
            if changed is None:  # two patches overlapping in one file
                raise PatchError(f"{patch.name}: conflicts with another patch in {path}; nothing was changed")
            texts[path] = changed
        report.append((patch.name, "applied" if action == "apply" else "reverted"))
    unwritable = [str(path) for path in texts if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK)]
    if unwritable:
        raise PatchError(f"no permission to write {', '.join(unwritable)}; nothing was changed")
    for path, lines in texts.items():
        _write_atomically(path, "".join(lines))
    return report


@lru_cache(maxsize=None)
def _applied(patch_file: Path, root: Path, stamps: tuple[int, ...]) -> bool:
    del stamps  # part of the cache key only: the patched files' modification times
    return status(parse_patch(patch_file.stem, patch_file.read_text()), root) == "applied"


def patch_applied(name: str) -> bool:
    """Whether patch `name` (a `patches/` file stem) is applied to the installed megatron-core's files
    (False for another megatron-core version).

    Cached per file modification time. It reads the files on disk: a module imported before the
    patch was applied still runs the old code until the interpreter restarts.
    """
    patch_file = PATCH_DIR / f"{name}.patch"
    if not patch_file.is_file():
        raise ValueError(f"unknown patch {name!r}; shipped: {[p.stem for p in sorted(PATCH_DIR.glob('*.patch'))]}")
    root = megatron_root()
    if installed_version(root) != MEGATRON_CORE_VERSION:
        return False
    files = parse_patch(name, patch_file.read_text()).files
    return _applied(patch_file, root, tuple((root / f.path).stat().st_mtime_ns for f in files))
