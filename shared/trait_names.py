"""What a trait name is, for every service: profile stores traits under such names, segmentation's rules and
prediction's score traits name them. One rule, so that a rule can never name a trait profile refuses to read."""

from __future__ import annotations

from shared.errors import control_character_problem

MAX_TRAIT_NAME_LENGTH = 128


def trait_name_problem(name: str) -> str:
    """Why `name` is no trait name ("" when it is): 1-128 characters, none of them a control character. The
    same names however a trait is written (identify event, BatchWriteTraits) or read (a `traits.<name>` path)."""
    if not 0 < len(name) <= MAX_TRAIT_NAME_LENGTH:
        shown = f"{name[:40]!r}{'...' if len(name) > 40 else ''}"
        return f"trait name {shown} is {len(name)} characters; trait names are 1-{MAX_TRAIT_NAME_LENGTH} characters"
    if problem := control_character_problem(name):
        return f"trait name {name[:40]!r}{'...' if len(name) > 40 else ''} {problem}"
    return ""
