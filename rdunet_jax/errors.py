"""The one exception type for user mistakes: `main` prints its message on one line and exits 2."""


class UserError(Exception):
    """A bad config, path, file or flag: something the user can fix, reported without a traceback."""
