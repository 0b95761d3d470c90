"""The one exception type users see: a message saying what was wrong, where, and what to do.

The CLI catches `SamfitError` and prints its message without a traceback; everything else is a bug.
"""
from __future__ import annotations

import difflib


class SamfitError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""


def closest(name: str, choices) -> str:
    """' Did you mean X?' for the nearest of `choices`, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def unknown_name(kind: str, name: str, choices) -> SamfitError:
    """Error for an unknown registry name, suggesting the closest valid one and listing all."""
    choices = sorted(choices)
    return SamfitError(
        f"Unknown {kind} '{name}'.{closest(name, choices)} Valid {kind}s: {', '.join(choices)}."
    )
