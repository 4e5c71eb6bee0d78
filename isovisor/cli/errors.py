"""Exit codes and the error type every CLI command may raise for a one-sentence failure."""

from __future__ import annotations

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as one sentence on stderr, exit status 1."""
