"""onecdp.segmentation.v1 Rule messages to domain rules and back (part of the gRPC adapter).

Structural problems of a Rule message (no node set, an unspecified operator, a null operand, a
window without a range) are reported here with their proto field paths; what a rule means is checked
by `rules.validate`. One-child groups collapse to their child (one canonical tree per rule).
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import struct_pb2, timestamp_pb2
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb

from services.segmentation.rules import (
    Aggregation,
    AllOf,
    AnyOf,
    Comparison,
    EventAggregateCondition,
    EventCountCondition,
    FixedRange,
    LastDays,
    Not,
    Operator,
    PropertyFilter,
    Rule,
    Scalar,
    ScoreCondition,
    ScoreField,
    SegmentCondition,
    TraitCondition,
    Window,
    segment_id_of_reference,
)
from shared.errors import Violations

_OPERATORS = list(Operator)  # in onecdp.segmentation.v1.Operator order, from 1
_AGGREGATIONS = list(Aggregation)  # in onecdp.segmentation.v1.Aggregation order, from 1
# The proto documents SCORE_FIELD_UNSPECIFIED as the probability.
_SCORE_FIELDS = {pb.SCORE_FIELD_UNSPECIFIED: ScoreField.PROBABILITY, pb.SCORE_FIELD_PROBABILITY: ScoreField.PROBABILITY,
                 pb.SCORE_FIELD_PERCENTILE: ScoreField.PERCENTILE}


def _operator(value: int, path: str, violations: Violations) -> Operator | None:
    if not 1 <= value <= len(_OPERATORS):
        violations.add(f"{path}.operator", "an operator is required")
        return None
    return _OPERATORS[value - 1]


def _scalar(value: struct_pb2.Value, path: str, violations: Violations) -> Scalar | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    violations.add(path, "a string, a number or true/false is required (null, lists and objects are not operands)")
    return None


def _comparison(operator_value: int, value: struct_pb2.Value | None, values: list[struct_pb2.Value], *,
                has_value: bool, path: str, violations: Violations) -> Comparison | None:
    operator = _operator(operator_value, path, violations)
    if operator is None:
        return None
    count = operator.operand_count
    if count == 0:
        return Comparison(operator)
    if count == 1:
        if not has_value or value is None:
            violations.add(f"{path}.value", f"{operator.value} needs `value`")
            return None
        scalar = _scalar(value, f"{path}.value", violations)
        return Comparison(operator, (scalar,)) if scalar is not None else None
    scalars = [_scalar(v, f"{path}.values[{i}]", violations) for i, v in enumerate(values)]
    if any(s is None for s in scalars):
        return None
    return Comparison(operator, tuple(s for s in scalars if s is not None))


def _numeric(operator_value: int, value: float, upper: float, path: str, violations: Violations) -> Comparison | None:
    operator = _operator(operator_value, path, violations)
    if operator is None:
        return None
    if operator is Operator.BETWEEN:
        return Comparison(operator, (float(value), float(upper)))
    if operator.operand_count != 1:
        return Comparison(operator)  # validation names the operator as not numeric
    return Comparison(operator, (float(value),))


def _window(message: pb.TimeWindow, has_window: bool, path: str, violations: Violations) -> Window | None:
    which = message.WhichOneof("window") if has_window else None
    if which == "last_days":
        return LastDays(message.last_days)
    if which == "between":
        between = message.between
        if not between.HasField("start_time") or not between.HasField("end_time"):
            violations.add(f"{path}.between", "start_time and end_time are required")
            return None
        start = _time(between.start_time, f"{path}.between.start_time", violations)
        end = _time(between.end_time, f"{path}.between.end_time", violations)
        return FixedRange(start, end) if start is not None and end is not None else None
    violations.add(path, "a window is required: last_days or between")
    return None


def _time(timestamp: timestamp_pb2.Timestamp, path: str, violations: Violations) -> datetime | None:
    try:
        return timestamp.ToDatetime(tzinfo=UTC)
    except ValueError as error:  # seconds beyond the years 1-9999 or nanos beyond 0-999,999,999
        violations.add(path, f"not a valid time: {error}")
        return None


def _filters(filters: list[pb.PropertyFilter], path: str,
             violations: Violations) -> tuple[PropertyFilter, ...] | None:
    """The filters, or None (violations added) when one of them is malformed: never a rule without it."""
    result = []
    for index, item in enumerate(filters):
        comparison = _comparison(item.operator, item.value, list(item.values), has_value=item.HasField("value"),
                                 path=f"{path}[{index}]", violations=violations)
        if comparison is not None:
            result.append(PropertyFilter(item.property, comparison))
    return tuple(result) if len(result) == len(filters) else None


def rule_from_message(message: pb.Rule, path: str, violations: Violations) -> Rule | None:
    """The domain rule of a Rule message, or None with violations added."""
    which = message.WhichOneof("node")
    if which in ("all", "any"):
        group = message.all if which == "all" else message.any
        children = [rule_from_message(child, f"{path}.{which}.rules[{i}]", violations)
                    for i, child in enumerate(group.rules)]
        if not children:
            violations.add(f"{path}.{which}.rules", "a group needs at least one rule")
            return None
        if any(child is None for child in children):
            return None
        rules = tuple(child for child in children if child is not None)
        if len(rules) == 1:
            return rules[0]
        return AllOf(rules) if which == "all" else AnyOf(rules)
    if which == "negate":
        child = rule_from_message(message.negate, f"{path}.negate", violations)
        return Not(child) if child is not None else None
    if which == "trait":
        trait = message.trait
        comparison = _comparison(trait.operator, trait.value, list(trait.values), has_value=trait.HasField("value"),
                                 path=f"{path}.trait", violations=violations)
        return TraitCondition(trait.field, comparison) if comparison is not None else None
    if which == "event_count":
        count = message.event_count
        filters = _filters(list(count.filters), f"{path}.event_count.filters", violations)
        window = _window(count.window, count.HasField("window"), f"{path}.event_count.window", violations)
        numeric = _numeric(count.operator, count.count, count.count_upper, f"{path}.event_count", violations)
        if filters is None or window is None or numeric is None:
            return None
        return EventCountCondition(count.event_name, filters, window, numeric)
    if which == "event_aggregate":
        aggregate = message.event_aggregate
        here = f"{path}.event_aggregate"
        filters = _filters(list(aggregate.filters), f"{here}.filters", violations)
        window = _window(aggregate.window, aggregate.HasField("window"), f"{here}.window", violations)
        numeric = _numeric(aggregate.operator, aggregate.value, aggregate.value_upper, here, violations)
        aggregation = None
        if 1 <= aggregate.aggregation <= len(_AGGREGATIONS):
            aggregation = _AGGREGATIONS[aggregate.aggregation - 1]
        else:
            violations.add(f"{here}.aggregation", "an aggregation is required: SUM, AVERAGE, MIN or MAX")
        if filters is None or window is None or numeric is None or aggregation is None:
            return None
        return EventAggregateCondition(aggregate.event_name, aggregate.property, aggregation, filters, window,
                                       numeric)
    if which == "score":
        score = message.score
        numeric = _numeric(score.operator, score.value, score.value_upper, f"{path}.score", violations)
        score_field = _SCORE_FIELDS.get(score.score_field)
        if score_field is None:
            violations.add(f"{path}.score.score_field", f"unknown score field {score.score_field}: "
                                                        "SCORE_FIELD_PROBABILITY or SCORE_FIELD_PERCENTILE")
        if numeric is None or score_field is None:
            return None
        return ScoreCondition(score.model, score_field, numeric)
    if which == "segment":
        return SegmentCondition(segment_id_of_reference(message.segment.segment))
    violations.add(path, "a rule node is required: all, any, negate, trait, event_count, event_aggregate, score or "
                         "segment")
    return None


# ---- domain to messages ---------------------------------------------------------------------------

def _value(value: Scalar) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    return struct_pb2.Value(number_value=float(value))


def _operator_value(operator: Operator) -> pb.Operator.ValueType:
    return pb.Operator.ValueType(_OPERATORS.index(operator) + 1)


def _fill_comparison(target: pb.TraitCondition | pb.PropertyFilter, comparison: Comparison) -> None:
    target.operator = _operator_value(comparison.operator)
    if comparison.operator.operand_count == 1:
        target.value.CopyFrom(_value(comparison.operands[0]))
    elif comparison.operator.operand_count != 0:
        target.values.extend(_value(v) for v in comparison.operands)


def _fill_window(target: pb.TimeWindow, window: Window) -> None:
    if isinstance(window, LastDays):
        target.last_days = window.days
    else:
        target.between.start_time.FromDatetime(window.start)
        target.between.end_time.FromDatetime(window.end)


def _bounds(comparison: Comparison) -> tuple[float, float]:
    operands = [float(v) for v in comparison.operands if not isinstance(v, str)]
    return (operands[0] if operands else 0.0), (operands[1] if len(operands) > 1 else 0.0)


def rule_to_message(rule: Rule) -> pb.Rule:
    if isinstance(rule, AllOf):
        return pb.Rule(all=pb.RuleGroup(rules=[rule_to_message(r) for r in rule.rules]))
    if isinstance(rule, AnyOf):
        return pb.Rule(any=pb.RuleGroup(rules=[rule_to_message(r) for r in rule.rules]))
    if isinstance(rule, Not):
        return pb.Rule(negate=rule_to_message(rule.rule))
    if isinstance(rule, TraitCondition):
        trait = pb.TraitCondition(field=rule.field)
        _fill_comparison(trait, rule.comparison)
        return pb.Rule(trait=trait)
    if isinstance(rule, SegmentCondition):
        return pb.Rule(segment=pb.SegmentMembershipCondition(segment=f"segments/{rule.segment_id}"))
    if isinstance(rule, ScoreCondition):
        value, upper = _bounds(rule.comparison)
        field = pb.SCORE_FIELD_PERCENTILE if rule.score_field is ScoreField.PERCENTILE else pb.SCORE_FIELD_PROBABILITY
        return pb.Rule(score=pb.ScoreCondition(model=rule.model, score_field=field,
                                               operator=_operator_value(rule.comparison.operator), value=value,
                                               value_upper=upper))
    filters = []
    for item in rule.filters:
        message = pb.PropertyFilter(property=item.property)
        _fill_comparison(message, item.comparison)
        filters.append(message)
    value, upper = _bounds(rule.comparison)
    if isinstance(rule, EventCountCondition):
        count = pb.EventCountCondition(event_name=rule.event_name, filters=filters,
                                       operator=_operator_value(rule.comparison.operator), count=int(value),
                                       count_upper=int(upper))
        _fill_window(count.window, rule.window)
        return pb.Rule(event_count=count)
    aggregate = pb.EventAggregateCondition(
        event_name=rule.event_name, property=rule.property,
        aggregation=pb.Aggregation.ValueType(_AGGREGATIONS.index(rule.aggregation) + 1), filters=filters,
        operator=_operator_value(rule.comparison.operator), value=value, value_upper=upper)
    _fill_window(aggregate.window, rule.window)
    return pb.Rule(event_aggregate=aggregate)
