"""Files and folders written whole or not at all: beside the target, then renamed over it."""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import yaml

from .errors import UserError


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that an interruption never leaves a half-written file."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def write_yaml(path: str, d: dict) -> None:
    write_text(path, yaml.safe_dump(d, sort_keys=False))


def read_yaml(path: str) -> dict:
    """The mapping in a YAML config file. Raises: UserError (missing file, bad YAML, not a mapping)."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found")
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UserError(f"{path} must hold a mapping of config keys (key: value), got {type(d).__name__}")
    return d


def save_figure(fig, path: str) -> None:
    """A matplotlib figure written atomically (the extension picks the format, so the temp name keeps it)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    fig.savefig(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path, replace: bool = True):
    """``with atomic_dir(path) as tmp:`` fill ``tmp``; on success it becomes ``path`` (an existing folder is
    replaced when ``replace``; otherwise a folder that appeared meanwhile is kept and ``tmp`` dropped), on an
    error ``tmp`` is removed and ``path`` is as it was."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.isdir(path):
        try:
            os.rename(tmp, path)
            return
        except OSError:  # another writer finished first
            if not os.path.isdir(path):
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    if not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tmp + ".old"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def move_contents(src: str, dst: str) -> list[str]:
    """Move every file under ``src`` to the same relative place under ``dst`` (each an atomic rename)."""
    moved = []
    for root, _, names in os.walk(src):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), src)
            target = os.path.join(dst, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(src, rel), target)
            moved.append(rel)
    return sorted(moved)
