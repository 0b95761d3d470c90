"""KEY=VALUE pairs from repeatable command-line options (--set, --method-arg, --slurm-arg)."""
from __future__ import annotations

from samfit.errors import SamfitError


def parse_pairs(pairs: list[str] | None, option: str, example: str) -> dict[str, str]:
    """['rank=4', 'alpha=16'] -> {'rank': '4', 'alpha': '16'}: keys with '-' read as '_', values kept as text
    (the caller knows their types). A pair without '=' or with an empty key is an error naming the option."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SamfitError(f"{option} '{pair}' is not of the form KEY=VALUE (e.g. {option} {example}).")
        out[key] = value.strip()
    return out
