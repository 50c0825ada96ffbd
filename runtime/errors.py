"""The one exception type for user mistakes (bad paths, bad flags, bad files): the CLI prints its
message as one line and exits non-zero. Anything else is a bug and keeps its traceback."""


import json
from pathlib import Path


class UserError(Exception):
    pass


def read_json(path: Path, error: type[UserError], missing: str) -> object:
    """Parse a JSON file; a missing file raises `error(missing)`, bad JSON an error naming the line."""
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
