"""The one exception type for user mistakes (bad paths, bad flags, bad files): the CLI prints its
message as one line and exits non-zero. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    pass
