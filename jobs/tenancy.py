"""What every store of tenant data shares: the default project, and the error of a bad cursor.

A project is the tenant of a key (`project` in the keys file). Files, jobs and evals carry the
project of the key that made them and are found only from keys of the same project; data stored
before projects existed belongs to `DEFAULT_PROJECT`.
"""

DEFAULT_PROJECT = "default"


class UnknownCursor(ValueError):
    """A list's `after` names no item of that list (of that project)."""
