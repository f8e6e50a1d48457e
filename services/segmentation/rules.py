"""Segment rules: the rule tree, what each field of a profile is, and the validation of a rule.

Plain data, no grpc: the gRPC adapter turns onecdp.segmentation.v1.Rule messages into these and back,
and `services.segmentation.text` reads and writes the text form. Every node remembers where it
started in the text it was parsed from (`position`, not part of equality), so a validation error on
a rule given as text can point at the offending character.

A one-child AND/OR group means its child; the adapter collapses it, so every rule has one canonical
tree and one canonical text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum, StrEnum
from typing import Any

from shared.errors import control_character_problem
from shared.trait_names import MAX_TRAIT_NAME_LENGTH

# A constant a condition compares with. Numbers are floats, like google.protobuf.Value's (MAX_NUMBER).
Scalar = str | float | bool

MAX_LAST_DAYS = 3650
# \Z, not $: `$` also matches before a trailing newline, and "vip\n" is no segment id.
SEGMENT_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
# Plain names: what the text form's tokenizer reads as one name (it uses this pattern). The text form
# writes every other trait and property name quoted (`traits."Plan Name"`, `event("o", "类别" = "书")`).
NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)*"
NAME = re.compile(NAME_PATTERN)
# Words the text form reads as keywords in any case; a property named after one is written quoted.
KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "CONTAINS", "EXISTS", "BETWEEN"})
# The profile service's rule for trait names (BatchWriteTraits: 1-128 characters, any characters): a rule
# can name every trait profile accepts, and nothing profile would refuse.
# How deep groups and NOTs may nest. Deep enough for any rule a person writes, and the Rule message of a
# rule this deep stays inside protobuf's 100-level decoding limit (a group is two message levels).
MAX_RULE_DEPTH = 32
# How big a rule may be: conditions (comparisons, event counts and aggregates, scores, segment references),
# and characters of its text (the text a request gives, and the canonical text of a rule given as a tree, so
# that every stored rule can be sent back as text). Rules people write have a handful to a few dozen
# conditions and well under 2,000 characters; the text limit still leaves room for an IN list of about 1,500
# ids. Every condition is evaluated for every affected person on each profile change, and for every profile
# in a recompute, and every rule is read and parsed on each real-time round: a rule of 50,000 ORs (1.35 MB)
# would make each of those thousands of times slower for everyone.
MAX_RULE_CONDITIONS = 256
MAX_RULE_TEXT_LENGTH = 32_768
# Event counts are int64 in the Rule message (fields of their own), so they have their own bound.
MAX_COUNT = 2**63 - 1
# Every other number of a rule (a trait's, a property's, an aggregate's, a score's value) is within
# +/-(2**53 - 1), JSON's and JavaScript's safe integers. Such numbers are doubles (google.protobuf.Value),
# and only this far does a double hold every whole number: past it `traits.crm_number = 9007199254740993`
# would silently compare with 9007199254740992 and match other persons (traits are stored as JSON, and hold
# such ints exactly). 2**53 itself is excluded, for 2**53 + 1 arrives as it. Ids that large are compared as
# strings; no count, amount or score a person compares with is near this.
MAX_NUMBER = 2**53 - 1
# Window times are written with four-digit years, and readers subtract margins from window starts.
EARLIEST_WINDOW_TIME = datetime(1000, 1, 1, tzinfo=UTC)
SCORE_TRAIT_PREFIX = "score_"
PERCENTILE_SUFFIX = "_percentile"


class Operator(StrEnum):
    """Comparison operators; the values are their spelling in the text form."""

    EQUAL = "="
    NOT_EQUAL = "!="
    LESS = "<"
    LESS_OR_EQUAL = "<="
    GREATER = ">"
    GREATER_OR_EQUAL = ">="
    IN = "IN"
    CONTAINS = "CONTAINS"
    EXISTS = "EXISTS"
    BETWEEN = "BETWEEN"

    @property
    def operand_count(self) -> int | None:
        """How many operands it takes: 0, 1, 2, or None for one or more (IN)."""
        if self is Operator.EXISTS:
            return 0
        if self is Operator.BETWEEN:
            return 2
        if self is Operator.IN:
            return None
        return 1


ORDERING = frozenset({Operator.LESS, Operator.LESS_OR_EQUAL, Operator.GREATER, Operator.GREATER_OR_EQUAL,
                      Operator.BETWEEN})
# Operators a number (event count, aggregate, score) can be compared with.
NUMERIC_OPERATORS = frozenset({Operator.EQUAL, Operator.NOT_EQUAL, *ORDERING})


class Aggregation(StrEnum):
    """Aggregations of an event property; the values are their text-form function names."""

    SUM = "sum"
    AVERAGE = "avg"
    MIN = "min"
    MAX = "max"


class ScoreField(StrEnum):
    PROBABILITY = "probability"
    PERCENTILE = "percentile"


class FieldType(Enum):
    """What a computed trait holds; stored traits are untyped (their values carry their type)."""

    NUMBER = "number"
    STRING = "string"
    TIMESTAMP = "timestamp"
    STRING_LIST = "list of strings"


# The computed traits a rule may name, after onecdp.profile.v1.ComputedTraits and Preferences.
COMPUTED_FIELDS: Mapping[str, FieldType] = {
    "first_seen_time": FieldType.TIMESTAMP,
    "last_seen_time": FieldType.TIMESTAMP,
    "recency_days": FieldType.NUMBER,
    "frequency": FieldType.NUMBER,
    "monetary": FieldType.NUMBER,
    "average_order_value": FieldType.NUMBER,
    "lifetime_value": FieldType.NUMBER,
    "event_count": FieldType.NUMBER,
    "rfm.recency_score": FieldType.NUMBER,
    "rfm.frequency_score": FieldType.NUMBER,
    "rfm.monetary_score": FieldType.NUMBER,
    "rfm.segment": FieldType.STRING,
    "lifecycle_stage": FieldType.STRING,
    "top_categories": FieldType.STRING_LIST,
    "top_brands": FieldType.STRING_LIST,
}
# The values an enumerated computed trait takes (lower-case names of onecdp.profile.v1 enums).
COMPUTED_CHOICES: Mapping[str, frozenset[str]] = {
    "lifecycle_stage": frozenset({"new", "active", "silent", "churned"}),
    "rfm.segment": frozenset({"champions", "loyal", "new", "promising", "need_attention", "at_risk", "hibernating"}),
}


def _text_position() -> Any:
    """Where a node started in the text it was parsed from (-1: not parsed); not part of equality."""
    return field(default=-1, compare=False, repr=False)


def _text_parts() -> Any:
    """Where the parts of a condition start in the text it was parsed from, by their proto field path
    below the condition (`operator`, `value`, `value_upper`, `window`, `filters[0].value`, ...); not
    part of equality. Empty when not parsed."""
    return field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Comparison:
    """`<subject> <operator> <operands>`; operand count as the operator requires."""

    operator: Operator
    operands: tuple[Scalar, ...] = ()


@dataclass(frozen=True)
class LastDays:
    """(as_of - days, as_of]: moves with evaluation time, so memberships expire."""

    days: int


@dataclass(frozen=True)
class FixedRange:
    """[start, end)."""

    start: datetime
    end: datetime


Window = LastDays | FixedRange


@dataclass(frozen=True)
class PropertyFilter:
    property: str
    comparison: Comparison


@dataclass(frozen=True)
class TraitCondition:
    """`traits.<name>` or `computed.<name>` compared with constants."""

    field: str
    comparison: Comparison
    position: int = _text_position()
    parts: Mapping[str, int] = _text_parts()


@dataclass(frozen=True)
class EventCountCondition:
    event_name: str
    filters: tuple[PropertyFilter, ...]
    window: Window
    comparison: Comparison  # numeric operands: counts
    position: int = _text_position()
    parts: Mapping[str, int] = _text_parts()


@dataclass(frozen=True)
class EventAggregateCondition:
    event_name: str
    property: str
    aggregation: Aggregation
    filters: tuple[PropertyFilter, ...]
    window: Window
    comparison: Comparison  # numeric operands
    position: int = _text_position()
    parts: Mapping[str, int] = _text_parts()


@dataclass(frozen=True)
class ScoreCondition:
    """A prediction score, read from the trait the prediction service writes back (see `score_trait`)."""

    model: str  # `models/{model_id}`; a bare `{model_id}` given to the constructor is stored as the name
    score_field: ScoreField
    comparison: Comparison  # numeric operands
    position: int = _text_position()
    parts: Mapping[str, int] = _text_parts()

    def __post_init__(self) -> None:
        # Both forms accept the bare id, as segment(...) does; one canonical name keeps one rule one tree.
        object.__setattr__(self, "model", model_name_of_reference(self.model))


@dataclass(frozen=True)
class SegmentCondition:
    segment_id: str
    position: int = _text_position()
    parts: Mapping[str, int] = _text_parts()


@dataclass(frozen=True)
class AllOf:
    rules: tuple[Rule, ...]
    position: int = _text_position()


@dataclass(frozen=True)
class AnyOf:
    rules: tuple[Rule, ...]
    position: int = _text_position()


@dataclass(frozen=True)
class Not:
    rule: Rule
    position: int = _text_position()


Condition = TraitCondition | EventCountCondition | EventAggregateCondition | ScoreCondition | SegmentCondition
Rule = AllOf | AnyOf | Not | Condition


def score_trait(model: str, score_field: ScoreField) -> str:
    """The profile trait holding a model's score: `score_<model_id>` (probability) or `..._percentile`."""
    model_id = model.removeprefix("models/")
    suffix = PERCENTILE_SUFFIX if score_field is ScoreField.PERCENTILE else ""
    return f"{SCORE_TRAIT_PREFIX}{model_id}{suffix}"


def model_name_of_reference(reference: str) -> str:
    """The model a `score(...)` condition names: `models/{id}`, or the bare `{id}` meaning the same (validation
    then checks the id)."""
    return f"models/{reference}" if reference and "/" not in reference else reference


def segment_name(segment_id: str) -> str:
    return f"segments/{segment_id}"


def segment_id_of_reference(reference: str) -> str:
    """The segment a `segment(...)` condition names: `segments/{id}` and the bare `{id}` are both accepted
    in both forms (validation then checks the id)."""
    return reference.removeprefix("segments/")


def conditions(rule: Rule) -> Iterator[Condition]:
    """The conditions of a rule, in rule order."""
    if isinstance(rule, AllOf | AnyOf):
        for child in rule.rules:
            yield from conditions(child)
    elif isinstance(rule, Not):
        yield from conditions(rule.rule)
    else:
        yield rule


def referenced_segments(rule: Rule) -> frozenset[str]:
    return frozenset(c.segment_id for c in conditions(rule) if isinstance(c, SegmentCondition))


def windows(rule: Rule) -> Iterator[Window]:
    for condition in conditions(rule):
        if isinstance(condition, EventCountCondition | EventAggregateCondition):
            yield condition.window


# ---- validation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuleProblem:
    """One thing wrong with a rule: where in the tree (a proto field path below `rule`), where in the text
    it was parsed from (-1 when not parsed), and what."""

    path: str
    position: int
    description: str


ModelExists = Callable[[str], bool | None]


def validate(rule: Rule, *, segment_id: str | None = None,
             references_of: Callable[[str], frozenset[str] | None] = lambda _: None,
             model_exists: ModelExists = lambda _: None) -> list[RuleProblem]:
    """Everything wrong with `rule`, in rule order.

    `references_of(id)` gives the segments a saved segment refers to, or None when there is no such
    segment; it lets validation refuse references to unknown segments and cycles through
    `segment_id` (the segment the rule belongs to, None for an unsaved rule). `model_exists(name)`
    says whether a `models/{id}` exists, or None when that cannot be known (then only its shape is
    checked).
    """
    problems: list[RuleProblem] = []
    _check(rule, "", problems, _Known(segment_id, references_of, model_exists), 0)
    return problems


@dataclass(frozen=True)
class _Known:
    """What validation knows besides the rule: its own segment, the other segments, the models."""

    segment_id: str | None
    references_of: Callable[[str], frozenset[str] | None]
    model_exists: ModelExists


def _check(rule: Rule, path: str, problems: list[RuleProblem], known: _Known, depth: int) -> None:
    """Adds the problems of `rule`, found at `path` below `depth` groups and NOTs."""
    def problem(sub_path: str, description: str) -> None:
        problems.append(RuleProblem(f"{path}{sub_path}".lstrip("."), _position_of(rule, sub_path), description))

    if isinstance(rule, AllOf | AnyOf | Not) and depth == MAX_RULE_DEPTH:
        # Not descending further also keeps validation itself from recursing without bound.
        problem("", f"groups and NOTs nest at most {MAX_RULE_DEPTH} levels deep; this one is nested deeper")
    elif isinstance(rule, AllOf | AnyOf):
        kind = "all" if isinstance(rule, AllOf) else "any"
        if not rule.rules:
            problem(f".{kind}.rules", "a group needs at least one rule")
        for index, child in enumerate(rule.rules):
            _check(child, f"{path}.{kind}.rules[{index}]", problems, known, depth + 1)
    elif isinstance(rule, Not):
        _check(rule.rule, f"{path}.negate", problems, known, depth + 1)
    elif isinstance(rule, TraitCondition):
        _check_trait(rule, problem)
    elif isinstance(rule, EventCountCondition):
        _check_event_name(rule.event_name, ".event_count.event_name", problem)
        _check_filters(rule.filters, ".event_count.filters", problem)
        _check_window(rule.window, ".event_count.window", problem)
        _check_numeric(rule.comparison, ".event_count", problem, fields=("count", "count_upper"), lower=0.0,
                       whole=True)
    elif isinstance(rule, EventAggregateCondition):
        _check_event_name(rule.event_name, ".event_aggregate.event_name", problem)
        _check_property_name(rule.property, ".event_aggregate.property", problem)
        _check_filters(rule.filters, ".event_aggregate.filters", problem)
        _check_window(rule.window, ".event_aggregate.window", problem)
        _check_numeric(rule.comparison, ".event_aggregate", problem)
    elif isinstance(rule, ScoreCondition):
        model_id = rule.model.removeprefix("models/")
        if not rule.model.startswith("models/") or not SEGMENT_ID.fullmatch(model_id):
            problem(".score.model", f"{rule.model!r} is not a model name like models/churn-90d or id like "
                                    "churn-90d (1-63 lower-case letters, digits and hyphens, starting with a letter)")
        elif known.model_exists(rule.model) is False:
            problem(".score.model", f"{rule.model} does not exist in the prediction service")
        upper = 1.0 if rule.score_field is ScoreField.PROBABILITY else 100.0
        _check_numeric(rule.comparison, ".score", problem, lower=0.0, upper=upper)
    elif isinstance(rule, SegmentCondition):
        _check_segment(rule.segment_id, problem, known.segment_id, known.references_of)


def _position_of(rule: Rule, sub_path: str) -> int:
    """Where in the text the part of `rule` at `sub_path` (`.trait.value`, ...) starts: the nearest part the
    parser recorded, else the start of the rule."""
    parts: Mapping[str, int] = getattr(rule, "parts", {})
    part = sub_path.lstrip(".").partition(".")[2]  # below the condition's kind
    while part:
        if part in parts:
            return parts[part]
        part = part[:part.rindex("[")] if part.endswith("]") else part.rpartition(".")[0]
    return rule.position


def _check_trait(rule: TraitCondition, problem: Callable[[str, str], None]) -> None:
    head, _, name = rule.field.partition(".")
    comparison = rule.comparison
    field_type: FieldType | None = None
    if head == "computed" and name in COMPUTED_FIELDS:
        field_type = COMPUTED_FIELDS[name]
    elif rule.field.startswith("traits."):
        if not 0 < len(name) <= MAX_TRAIT_NAME_LENGTH:
            which = "'traits.' names no trait" if not name else f"the trait name has {len(name)} characters"
            problem(".trait.field", f"{which}: a trait name is 1-{MAX_TRAIT_NAME_LENGTH} characters of any kind, as "
                                    "the profile service accepts them (traits.plan; in the rule text a name that "
                                    "is not plain is quoted: traits.\"Plan Name\")")
            return
        if control := control_character_problem(name):
            # Profile stores no such trait and refuses to read one: no profile could ever match.
            problem(".trait.field", f"the trait name {control}, as the profile service refuses in trait names")
            return
        field_type = None  # stored traits are untyped: their values carry the type
    else:
        problem(".trait.field", f"unknown field {rule.field!r}: use traits.<name> (any trait name of 1-"
                                f"{MAX_TRAIT_NAME_LENGTH} characters) or computed.<name> with one of "
                                f"{', '.join(sorted(COMPUTED_FIELDS))}")
        return
    if not _check_operands(comparison, ".trait", problem):
        return
    operator, operands = comparison.operator, comparison.operands
    kinds = {_kind(v) for v in operands}
    if len(kinds) > 1:
        problem(".trait.values", f"operands of one comparison must share a type, got {', '.join(sorted(kinds))}")
        return
    kind = kinds.pop() if kinds else None
    if kind == "bool" and operator in ORDERING | {Operator.CONTAINS}:
        problem(".trait.operator", f"{operator.value} does not apply to true/false")
    if operator is Operator.BETWEEN and kind == "number" and float(operands[0]) > float(operands[1]):
        problem(".trait.values", "BETWEEN needs the lower bound first")
    if field_type is None or kind is None:
        return
    expected = {FieldType.NUMBER: "number", FieldType.STRING: "string", FieldType.TIMESTAMP: "string",
                FieldType.STRING_LIST: "string"}[field_type]
    if kind != expected:
        problem(".trait.value", f"{rule.field} is a {field_type.value}; it cannot be compared with a {kind}")
        return
    if field_type is FieldType.STRING and operator in ORDERING:
        problem(".trait.operator", f"{rule.field} is categorical: {operator.value} does not apply; use =, !=, IN or "
                                   "EXISTS")
        return
    if field_type is FieldType.STRING_LIST and operator is not Operator.CONTAINS:
        problem(".trait.operator", f"{rule.field} is a list: use CONTAINS or EXISTS")
    if field_type is FieldType.NUMBER and operator is Operator.CONTAINS:
        problem(".trait.operator", f"{rule.field} is a number: CONTAINS does not apply")
    if field_type is FieldType.TIMESTAMP:
        for value in operands:
            if parse_time(str(value)) is None:
                problem(".trait.value", f"{rule.field} is a timestamp; {value!r} is not an RFC 3339 time "
                                        "like 1997-03-01T00:00:00Z")
    choices = COMPUTED_CHOICES.get(rule.field.partition(".")[2])
    if choices is not None and operator in (Operator.EQUAL, Operator.NOT_EQUAL, Operator.IN):
        for value in operands:
            if value not in choices:
                problem(".trait.value",
                        f"{value!r} is not a value of {rule.field}: one of {', '.join(sorted(choices))}")


def _check_operands(comparison: Comparison, path: str, problem: Callable[[str, str], None]) -> bool:
    wanted = comparison.operator.operand_count
    got = len(comparison.operands)
    if wanted is None and got == 0:
        problem(f"{path}.values", "IN needs at least one value")
        return False
    if wanted is not None and wanted != got:
        target = f"{path}.values" if wanted == 2 or got > 1 else f"{path}.value"
        problem(target, f"{comparison.operator.value} takes {wanted} operand(s), got {got}")
        return False
    for index, value in enumerate(comparison.operands):
        where = f"{path}.value" if wanted == 1 else f"{path}.values[{index}]"
        if isinstance(value, float) and not math.isfinite(value):
            problem(where, "numbers must be finite")
            return False
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > MAX_NUMBER:
            problem(where, beyond_safe_integers(value))
            return False
    return True


def beyond_safe_integers(value: float | Decimal) -> str:
    """Why a rule cannot hold `value` (its magnitude is past MAX_NUMBER), and what to write instead."""
    shown = str(value) if isinstance(value, int) else f"{value:.17g}"
    return (f"numbers in a rule are within -{MAX_NUMBER} to {MAX_NUMBER} (2**53 - 1), got {shown}: they are "
            "doubles, and past that a double holds only some whole numbers (9007199254740993 becomes "
            "9007199254740992), so the rule would compare with another number than the one written; compare a "
            "larger id as a string, stored as a string trait (traits.crm_id = \"9007199254740993\")")


def _kind(value: Scalar) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, float | int) else "string"


def _check_event_name(name: str, path: str, problem: Callable[[str, str], None]) -> None:
    if not 0 < len(name) <= 128:
        problem(path, "an event name of 1-128 characters is required")


def _check_property_name(name: str, path: str, problem: Callable[[str, str], None]) -> None:
    # Profile stores event properties under any key; the text form quotes the names that are not plain.
    if not name:
        problem(path, "a property name is required (any text; the rule text quotes names that are not plain, "
                      "e.g. \"unit price\")")


def _check_filters(filters: tuple[PropertyFilter, ...], path: str, problem: Callable[[str, str], None]) -> None:
    for index, item in enumerate(filters):
        _check_property_name(item.property, f"{path}[{index}].property", problem)
        if _check_operands(item.comparison, f"{path}[{index}]", problem):
            kinds = {_kind(v) for v in item.comparison.operands}
            if len(kinds) > 1:
                problem(f"{path}[{index}].values", "operands of one comparison must share a type")
            elif kinds == {"bool"} and item.comparison.operator in ORDERING | {Operator.CONTAINS}:
                problem(f"{path}[{index}].operator", f"{item.comparison.operator.value} does not apply to true/false")


def _check_window(window: Window, path: str, problem: Callable[[str, str], None]) -> None:
    if isinstance(window, LastDays):
        if not 1 <= window.days <= MAX_LAST_DAYS:
            problem(f"{path}.last_days", f"must be 1-{MAX_LAST_DAYS} days, got {window.days}")
        return
    for name, time in (("start_time", window.start), ("end_time", window.end)):
        if time < EARLIEST_WINDOW_TIME:
            problem(f"{path}.between.{name}", f"must be in the years {EARLIEST_WINDOW_TIME.year}-9999, got "
                                                f"{time.isoformat()}")
            return
    if window.start >= window.end:
        problem(f"{path}.between.end_time", "the window is empty: end_time must be after start_time")


def _check_numeric(comparison: Comparison, path: str, problem: Callable[[str, str], None], *,
                   fields: tuple[str, str] = ("value", "value_upper"), lower: float | None = None,
                   upper: float | None = None, whole: bool = False) -> None:
    """Checks a comparison of a number whose operands are the message fields `fields` (the operand, the
    upper bound of BETWEEN); `whole` numbers are counts, int64 in the message (MAX_COUNT, not MAX_NUMBER)."""
    operator = comparison.operator
    if operator not in NUMERIC_OPERATORS:
        problem(f"{path}.operator", f"{operator.value} does not apply to a number; use =, !=, <, <=, >, >= or BETWEEN")
        return
    wanted = 2 if operator is Operator.BETWEEN else 1
    if len(comparison.operands) != wanted:
        problem(f"{path}.{fields[0]}", f"{operator.value} takes {wanted} operand(s), got {len(comparison.operands)}")
        return
    values: list[float] = []
    for field_name, operand in zip(fields, comparison.operands, strict=False):
        where = f"{path}.{field_name}"
        if _kind(operand) != "number":
            problem(where, f"expected a number, got {operand!r}")
            return
        value = float(operand)
        if not math.isfinite(value):
            problem(where, "numbers must be finite")
            return
        if whole and not value.is_integer():
            problem(where, f"an event count is a whole number, got {value:g}")
        if whole and value > MAX_COUNT:  # an exact comparison: float(MAX_COUNT) would round up to 2**63
            problem(where, f"an event count is at most {MAX_COUNT} (int64), got {value:g}")
        elif not whole and abs(value) > MAX_NUMBER:
            problem(where, beyond_safe_integers(value))
        if lower is not None and value < lower:
            problem(where, f"must be at least {lower:g}, got {value:g}")
        if upper is not None and value > upper:
            problem(where, f"must be at most {upper:g}, got {value:g}")
        values.append(value)
    if operator is Operator.BETWEEN and values[0] > values[1]:
        problem(f"{path}.{fields[1]}", f"BETWEEN needs lower <= upper, got {values[0]:g} and {values[1]:g}")


def _check_segment(target: str, problem: Callable[[str, str], None], segment_id: str | None,
                   references_of: Callable[[str], frozenset[str] | None]) -> None:
    if not SEGMENT_ID.match(target):
        problem(".segment.segment", f"{target!r} is not a segment id (lower-case letters, digits, hyphens) "
                                    "or name (segments/<id>)")
        return
    if target == segment_id:
        problem(".segment.segment", f"segments/{target} refers to itself")
        return
    if references_of(target) is None:
        problem(".segment.segment", f"segments/{target} does not exist")
        return
    if segment_id is not None:
        path = _path_to(target, segment_id, references_of)
        if path is not None:
            cycle = " -> ".join(f"segments/{s}" for s in [segment_id, *path])
            problem(".segment.segment", f"cycle of segment references: {cycle}")


def _path_to(start: str, goal: str, references_of: Callable[[str], frozenset[str] | None]) -> list[str] | None:
    """A chain of references start -> ... -> goal, if there is one (depth-first)."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        current, chain = stack.pop()
        if current == goal:
            return chain
        if current in seen:
            continue
        seen.add(current)
        for following in sorted(references_of(current) or ()):
            stack.append((following, [*chain, following]))
    return None


def parse_time(text: str) -> datetime | None:
    """An RFC 3339 time with an offset (or a bare date, meaning midnight UTC); None when it is not one."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if value.tzinfo is None:
        if len(text) != 10:  # a bare date is midnight UTC; a local time without offset is ambiguous
            return None
        value = value.replace(tzinfo=UTC)
    return value
