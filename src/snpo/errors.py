"""User-facing errors: one base class, so the CLI prints any of them as one line.

Every error a user can fix (a bad config value, a missing file, unusable data, weights that
are not where they were said to be) derives from :class:`UserError`. Its message is one line
that names the field or file and says what was expected; ``snpo`` prints it without a
traceback and exits with 2. Anything else is a bug and keeps its traceback.

``UserError`` is a ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message is one line naming the field or file."""


class ConfigError(UserError):
    """A bad config key or value; the message starts with the field's name."""
