"""How a YAML or command-line value becomes a config field's value, by the field's kind (``config.key``).

Each converter takes (value, "name=value is not valid; ") and returns (value, None) or (None, the problem).
"""
import math

import yaml

_NONE_WORDS = ("none", "null")


def _is_none(value, words=_NONE_WORDS) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in words)


def _split(value) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _to_str(value, bad):
    ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return (str(value), None) if ok else (None, bad + "give a string")


def _to_int(value, bad):
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None, bad + "give an integer"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return (value, None) if isinstance(value, int) and not isinstance(value, bool) else (None, bad + "give an integer")


def _to_float(value, bad):
    if isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            value = float(value.strip())
        except ValueError:
            return None, bad + "give a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, bad + "give a number"
    return float(value), None


def _to_bool(value, bad):
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        value = value.lower() in ("true", "yes", "1")
    return (value, None) if isinstance(value, bool) else (None, bad + "give true or false")


def _to_floats(value, bad):
    if _is_none(value, _NONE_WORDS + ("default",)):
        return None, None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value]
    try:
        return [float(v) for v in value if not isinstance(v, bool)], None
    except (TypeError, ValueError):
        return None, bad + "give a list of numbers such as 0.4,0.3,0.2,0.1"


def _to_ranks(value, bad):
    if _is_none(value, _NONE_WORDS + ("default",)):
        return None, None
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        return None, bad + "give a list of integers such as 1,2,4,8"
    out = []
    for v in value:
        try:
            out.append(int(v) if not isinstance(v, bool) and float(v) == int(float(v)) else None)
        except (TypeError, ValueError):
            out.append(None)
    return (None, bad + "give a list of integers such as 1,2,4,8") if None in out else (out, None)


def _to_modules(value, bad):
    if isinstance(value, str) and value:
        return value, None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value, None
    return None, bad + "give module names (q_proj,v_proj), a regex or all-linear"


def _to_fsdp(value, bad):
    """true/false, or Trainer FSDP options ("full_shard auto_wrap")."""
    if value is None or value is False:
        return "", None
    if value is True:
        return "true", None
    if not isinstance(value, str):
        return None, bad + "give true, false or FSDP options such as 'full_shard auto_wrap'"
    words = value.replace(",", " ").lower().split()
    if words in ([], ["false"], ["no"], ["off"], ["none"], ["0"]):
        return "", None
    return ("true" if words in (["true"], ["yes"], ["on"], ["1"]) else " ".join(words)), None


def _to_json_setting(value, bad):
    """A mapping, or the path of a JSON file (read and checked by ``sharding_problems``)."""
    if _is_none(value, _NONE_WORDS + ("",)):
        return None, None
    if isinstance(value, dict):
        return dict(value), None
    return (value, None) if isinstance(value, str) else (None, bad + "give a mapping or the path of a JSON file")


def _to_columns(value, bad):
    """format column -> data column: a mapping, or "prompt=question,completion=answer"."""
    if _is_none(value, _NONE_WORDS + ("",)):
        return None, None
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in _split(value)]
        if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            return None, bad + "give format=column pairs such as prompt=question,completion=answer"
        value = {k.strip(): v.strip() for k, v in pairs}
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, str) and v
                                                 for k, v in value.items()):
        return dict(value), None
    return None, bad + "give format=column pairs such as prompt=question,completion=answer"


def _to_dict(value, bad):
    return (dict(value), None) if isinstance(value, dict) else (None, bad + "give a mapping")


COERCE = {"str": _to_str, "str?": _to_str, "int": _to_int, "int?": _to_int, "float": _to_float, "bool": _to_bool,
          "floats?": _to_floats, "ranks": _to_ranks, "modules": _to_modules, "fsdp": _to_fsdp,
          "json?": _to_json_setting, "dict": _to_dict,
          "columns?": _to_columns}


def _parse_cli(kind: str, value: str):
    """A command-line string as the YAML value it stands for (comma lists for ranks, weights and modules)."""
    if kind in ("ranks", "floats?", "modules") and "," in value:
        return _split(value)
    if kind in ("str", "modules", "columns?"):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value




def coerce_kind(kind: str, name: str, value, from_cli: bool = False):
    """``value`` as a field ``name`` of ``kind``; CLI strings are parsed (YAML scalars, comma lists).

    Returns:
        (value, problem): problem is None, or a message naming the key, the value and what is valid.
    """
    bad = f"{name}={value!r} is not valid; "
    if from_cli and isinstance(value, str):
        value = _parse_cli(kind, value)
        if kind == "dict" and isinstance(value, str):
            return None, bad + "give a mapping such as {layers_to_transform: [0, 1]}"
    if kind in ("str?", "int?") and _is_none(value):
        return None, None
    return COERCE[kind](value, bad)
