"""Model specs (what to predict, over which horizon, for whom) and model resource names, validated.

Defaults are resolved when a spec is accepted and stored resolved, so a model version's copy of its
spec says exactly what it was trained with even if a default changes later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import FieldViolation, InvalidArgument, Violations, check_display_name, control_character_problem
from shared.longrunning import operation_id_of

MIN_HORIZON_DAYS, MAX_HORIZON_DAYS = 1, 730
MAX_ELIGIBILITY_DAYS = 730
DEFAULT_ELIGIBILITY_DAYS = 90
DEFAULT_MIN_CLASS_COUNT = 100
MAX_MIN_CLASS_COUNT = 1_000_000
MAX_EVENT_NAMES = 100
MAX_EVENT_NAME_LENGTH = 128
DEFAULT_CONVERSION_EVENTS = ("order",)

# Whole strings only: use fullmatch. `\Z` (not `$`, which also matches before a final newline) keeps a
# caller's .match whole too, so "x1\n" is no model id however the pattern is applied.
MODEL_ID = re.compile(r"[a-z][a-z0-9-]{0,62}\Z")
_MODEL_NAME = re.compile(r"models/([^/]+)\Z")
_VERSION_NAME = re.compile(r"models/([^/]+)/versions/([^/]+)\Z")
# ASCII digits only: str.isdigit() and int() also take superscripts ("\u00b2": int() then fails) and other
# scripts' digits ("\u0661", Arabic-Indic one, read as 1).
_VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,8}\Z")


class PredictionKind(StrEnum):
    CONVERSION = "conversion"
    CHURN = "churn"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved spec. `event_names`: conversion targets, or churn's qualifying activity (empty: any event)."""

    kind: PredictionKind
    event_names: tuple[str, ...]
    horizon_days: int
    eligibility_days: int  # churn only; 0 for conversion
    min_class_count: int


def resolve_spec(kind: PredictionKind | None, event_names: list[str], horizon_days: int, *, eligibility_days: int,
                 min_class_count: int, field_prefix: str = "model.spec") -> ModelSpec:
    """Validate a requested spec (0 / empty meaning "default") and resolve its defaults.

    Raises InvalidArgument naming every bad field at once.
    """
    violations = Violations()
    violations.check(kind is not None, f"{field_prefix}.kind", "required: CONVERSION or CHURN")
    violations.check(MIN_HORIZON_DAYS <= horizon_days <= MAX_HORIZON_DAYS, f"{field_prefix}.horizon_days",
                     f"must be {MIN_HORIZON_DAYS}-{MAX_HORIZON_DAYS} days, got {horizon_days}")
    violations.check(len(event_names) <= MAX_EVENT_NAMES, f"{field_prefix}.event_names",
                     f"at most {MAX_EVENT_NAMES} event names, got {len(event_names)}")
    seen: set[str] = set()
    for index, name in enumerate(event_names):
        path = f"{field_prefix}.event_names[{index}]"
        if violations.check(1 <= len(name) <= MAX_EVENT_NAME_LENGTH and name.strip() == name, path,
                            f"an event name is 1-{MAX_EVENT_NAME_LENGTH} characters without surrounding spaces"):
            if problem := control_character_problem(name):
                violations.add(path, problem)
            violations.check(name not in seen, path, f"{name!r} is listed twice")
        seen.add(name)
    if kind is PredictionKind.CHURN:
        violations.check(0 <= eligibility_days <= MAX_ELIGIBILITY_DAYS, f"{field_prefix}.eligibility_days",
                         f"must be 1-{MAX_ELIGIBILITY_DAYS} days (0: default {DEFAULT_ELIGIBILITY_DAYS}), "
                         f"got {eligibility_days}")
    else:
        violations.check(eligibility_days == 0, f"{field_prefix}.eligibility_days",
                         "only churn models have an eligibility window; leave it 0 for conversion")
    violations.check(0 <= min_class_count <= MAX_MIN_CLASS_COUNT, f"{field_prefix}.min_class_count",
                     f"must be 1-{MAX_MIN_CLASS_COUNT} (0: default {DEFAULT_MIN_CLASS_COUNT}), got {min_class_count}")
    violations.raise_if_any("the model spec is invalid", reason="INVALID_MODEL_SPEC")
    assert kind is not None
    if kind is PredictionKind.CONVERSION:
        names = tuple(event_names) or DEFAULT_CONVERSION_EVENTS
        eligibility = 0
    else:
        names = tuple(event_names)
        eligibility = eligibility_days or DEFAULT_ELIGIBILITY_DAYS
    return ModelSpec(kind=kind, event_names=names, horizon_days=horizon_days, eligibility_days=eligibility,
                     min_class_count=min_class_count or DEFAULT_MIN_CLASS_COUNT)


def display_name_violations(display_name: str, field_path: str = "model.display_name") -> list[FieldViolation]:
    """What is wrong with a model's display name (shared.errors.check_display_name); empty when it is fine."""
    violations = Violations()
    check_display_name(violations, display_name, field_path)
    return violations.items


def check_model_id(model_id: str, field_path: str = "model_id") -> str:
    if not MODEL_ID.fullmatch(model_id):
        raise InvalidArgument.for_field(
            field_path, f"{model_id!r} is not a model id: 1-63 lower-case letters, digits and hyphens, "
            "starting with a letter", reason="BAD_MODEL_ID")
    return model_id


def model_name(model_id: str) -> str:
    return f"models/{model_id}"


def version_name(model_id: str, version_id: int) -> str:
    return f"models/{model_id}/versions/{version_id}"


def parse_model_name(name: str, field_path: str = "name") -> str:
    """The model id of `models/{model_id}`; InvalidArgument for anything else."""
    match = _MODEL_NAME.fullmatch(name)
    if not match:
        raise InvalidArgument.for_field(field_path, f"{name!r} is not a model name `models/{{model_id}}`",
                                        reason="BAD_RESOURCE_NAME")
    return check_model_id(match.group(1), field_path)


def parse_version_name(name: str, field_path: str = "name") -> tuple[str, int]:
    """(model id, version number) of `models/{model_id}/versions/{n}`; InvalidArgument otherwise."""
    match = _VERSION_NAME.fullmatch(name)
    version = match.group(2) if match else ""
    if not match or not _VERSION_NUMBER.fullmatch(version):
        raise InvalidArgument.for_field(
            field_path, f"{name!r} is not a model version name `models/{{model_id}}/versions/{{n}}` (n >= 1)",
            reason="BAD_RESOURCE_NAME")
    return check_model_id(match.group(1), field_path), int(version)


def operation_name(operation_id: str) -> str:
    return f"operations/{operation_id}"


def parse_operation_name(name: str, field_path: str = "name") -> str:
    """The operation id of `operations/{id}`: shared.longrunning's parser, the same for every service."""
    return operation_id_of(name, field_path)
