"""Argument parsing shared by the commands."""
from ..errors import UserError


def parse_ranks(text: str | None) -> list[int] | None:
    """'1,2,4' -> [1, 2, 4]; None stays None (the command's default ranks)."""
    if text is None:
        return None
    try:
        ranks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--ranks {text!r} is not valid; give comma-separated integers such as 1,2,4,8") from None
    if not ranks:
        raise UserError(f"--ranks {text!r} is empty; give comma-separated integers such as 1,2,4,8")
    return ranks


def unescape(text: str) -> str:
    """'\\n\\n' typed on a command line -> two newlines."""
    return text.replace("\\n", "\n").replace("\\t", "\t")
