"""One error type for every bad simulator input, so the CLI can turn it into a one-line message and exit 2."""

from __future__ import annotations


class SimInputError(ValueError):
    """A workload, trace, profile or cluster that cannot be simulated; the message names the field and the fix."""
