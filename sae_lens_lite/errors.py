"""The one exception type users see. The CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Something the user passed or pointed us at is wrong; the message says what to do."""
