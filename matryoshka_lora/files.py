"""Files written whole or not at all: beside the target, then renamed over it."""
import json
import os


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that an interruption never leaves a half-written file."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def write_yaml(path: str, d: dict) -> None:
    import yaml

    write_text(path, yaml.safe_dump(d, sort_keys=False))
