"""Rules past the limits of the text form and the Rule message are INVALID_ARGUMENT naming the part, over
real gRPC and Cassandra (they were INTERNAL: RecursionError, int64 overflow), and rules at the limits are
stored and read back."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from onecdp.segmentation.v1 import segmentation_service_pb2 as pb

from services.segmentation.rules import MAX_NUMBER, MAX_RULE_CONDITIONS, MAX_RULE_TEXT_LENGTH
from tests.services.segmentation.test_segments import Stub, create, failure

pytestmark = pytest.mark.integration

DEEPEST = "NOT " * 32 + "traits.a = 1"
LARGEST_COUNT = 2**63 - 1024  # the largest float below 2**63: counts are floats in rules, int64 in messages
SAFE = "numbers in a rule are within -9007199254740991 to 9007199254740991 (2**53 - 1)"


def test_rules_past_the_limits_are_refused_naming_the_part(segmentation: Stub) -> None:
    too_deep = "(" * 400 + "traits.a = 1" + ")" * 400
    for text, expected in [
        (too_deep, "at character 33: parentheses and NOTs nest at most 32 levels deep"),
        ("NOT " * 1200 + "traits.a = 1", "at character 129: parentheses and NOTs nest at most 32 levels deep"),
        ('event("order").count(last 9d) >= 1e30',
         "at character 34: an event count is at most 9223372036854775807 (int64), got 1e+30"),
        ('event("order").count(last 9d) BETWEEN 1 AND 99999999999999999999',
         "at character 45: an event count is at most 9223372036854775807 (int64), got 1e+20"),
        ('score("models/churn") BETWEEN 0.5 AND 2',
         "at character 39: must be at most 1, got 2 (rule.score.value_upper"),
        # Numbers beyond int64 were stored as the nearest double, and the text said another number.
        ("computed.frequency >= 99999999999999999999",
         f"at character 23: {SAFE}, got 1e+20"),
        ("traits.age = 12345678901234567890123", f"at character 14: {SAFE}"),
        ('event("o", amount > -1e30).count(last 9d) >= 1', f"at character 21: {SAFE}"),
        ('event("o").sum(amount, last 9d) BETWEEN 0 AND 1e19', f"at character 47: {SAFE}"),
    ]:
        code, _, fields = failure(segmentation.ParseSegmentRule, pb.ParseSegmentRuleRequest(rule_text=text))
        assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["rule_text"]), text
        assert fields["rule_text"].startswith(expected), fields
        code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
            segment_id="past-limits", segment=pb.Segment(rule_text=text)))
        assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment.rule_text"]), text
        assert fields["segment.rule_text"].startswith(expected), fields

    # The tree form: a trait name profile would refuse (129 characters).
    long_trait = pb.Rule(trait=pb.TraitCondition(field="traits." + "x" * 129, operator=pb.OPERATOR_EQUAL,
                                                 value=struct_pb2.Value(number_value=1)))
    unknown_score_field = pb.Rule(score=pb.ScoreCondition(model="models/churn", score_field=7,  # type: ignore[arg-type]
                                                          operator=pb.OPERATOR_GREATER, value=0.5))
    before_year_1 = pb.Rule(event_count=pb.EventCountCondition(
        event_name="order", operator=pb.OPERATOR_GREATER, count=1, window=pb.TimeWindow(between=pb.FixedRange(
            start_time=timestamp_pb2.Timestamp(seconds=-62135596801), end_time=timestamp_pb2.Timestamp(seconds=0)))))
    huge_trait = pb.Rule(trait=pb.TraitCondition(field="traits.age", operator=pb.OPERATOR_EQUAL,
                                                 value=struct_pb2.Value(number_value=1.2345678901234568e22)))
    huge_sum = pb.Rule(event_aggregate=pb.EventAggregateCondition(
        event_name="order", aggregation=pb.AGGREGATION_SUM, property="amount", operator=pb.OPERATOR_LESS,
        value=-1e20, window=pb.TimeWindow(last_days=9)))
    for rule, field, expected in [
        (huge_trait, "segment.rule.trait.value", SAFE),
        (huge_sum, "segment.rule.event_aggregate.value", SAFE),
        (long_trait, "segment.rule.trait.field", "the trait name has 129 characters"),
        (unknown_score_field, "segment.rule.score.score_field", "unknown score field 7"),
        (before_year_1, "segment.rule.event_count.window.between.start_time", "not a valid time"),
    ]:
        code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
            segment_id="past-limits", segment=pb.Segment(rule=rule)))
        assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, [field])
        assert fields[field].startswith(expected), fields


def test_whole_numbers_a_double_cannot_hold_are_refused_in_both_forms(segmentation: Stub) -> None:
    """Past 2**53 a double holds only some whole numbers: `traits.crm_number = 9007199254740993` was stored as
    9007199254740992 and matched the person whose (JSON, exact) trait is 9007199254740992, not the one
    written. Such numbers are refused naming the part; event counts (int64 fields) are not held to it."""
    def refused(rule: pb.Rule | None, text: str = "") -> tuple[str, str]:
        segment = pb.Segment(rule=rule) if rule is not None else pb.Segment(rule_text=text)
        code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
            segment_id="crm", segment=segment))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(fields) == 1, fields
        return next(iter(fields.items()))

    for text, expected, part in [
        ("traits.crm_number = 9007199254740993", f"at character 21: {SAFE}, got 9007199254740992", "trait.value"),
        ("traits.crm_number IN [1, -9007199254740992]", f"at character 23: {SAFE}, got -9007199254740992",
         "trait.values[1]"),
        ('event("o", ref = 1e16).count(last 9d) >= 1', f"at character 18: {SAFE}, got 10000000000000000",
         "event_count.filters[0].value"),
        ('event("o").max(ref, last 9d) = 9007199254740993', f"at character 32: {SAFE}", "event_aggregate.value"),
        # Written a fraction past the bound, it would round to 9007199254740991, inside it: only the text says.
        ("traits.crm_number = 9007199254740991.2", f"at character 21: {SAFE}, got 9007199254740991.2", ""),
    ]:
        field, description = refused(None, text)
        assert field == "segment.rule_text" and description.startswith(expected), (text, description)
        assert "compare a larger id as a string" in description
        assert not part or description.endswith(f"(rule.{part})"), description
    crm = pb.TraitCondition(field="traits.crm_number", operator=pb.OPERATOR_EQUAL,
                            value=struct_pb2.Value(number_value=9007199254740993))  # arrives as 9007199254740992
    in_filter = pb.EventCountCondition(
        event_name="o", operator=pb.OPERATOR_GREATER_OR_EQUAL, count=1, window=pb.TimeWindow(last_days=9),
        filters=[pb.PropertyFilter(property="ref", operator=pb.OPERATOR_BETWEEN, values=[
            struct_pb2.Value(number_value=0), struct_pb2.Value(number_value=2.0**60)])])
    aggregate = pb.EventAggregateCondition(event_name="o", aggregation=pb.AGGREGATION_MAX, property="ref",
                                           operator=pb.OPERATOR_LESS, value=-(2.0**53),
                                           window=pb.TimeWindow(last_days=9))
    for rule, path, shown in [(pb.Rule(trait=crm), "segment.rule.trait.value", "9007199254740992"),
                              (pb.Rule(event_count=in_filter), "segment.rule.event_count.filters[0].values[1]",
                               "1.152921504606847e+18"),
                              (pb.Rule(event_aggregate=aggregate), "segment.rule.event_aggregate.value",
                               "-9007199254740992")]:
        field, description = refused(rule)
        assert field == path and description.startswith(f"{SAFE}, got {shown}"), (field, description)
    # Within the bound numbers are exact and accepted; counts keep their own int64 bound.
    largest = create(segmentation, "crm", f"traits.crm_number IN [{MAX_NUMBER}, -{MAX_NUMBER}] AND "
                                          f'event("o").count(last 9d) < {2**60}')
    assert list(largest.rule.all.rules[0].trait.values) == [struct_pb2.Value(number_value=MAX_NUMBER),
                                                             struct_pb2.Value(number_value=-MAX_NUMBER)]
    assert largest.rule.all.rules[1].event_count.count == 2**60


def test_rules_past_the_size_limits_are_refused_naming_the_field(segmentation: Stub) -> None:
    # What an outside tester stored: 50,000 ORs, 1.35 MB of text.
    huge = " OR ".join(f"traits.a = {i}" for i in range(50_000))
    many = " OR ".join(f"traits.a = {i}" for i in range(MAX_RULE_CONDITIONS + 1))  # 4 kB, too many conditions
    long_list = "traits.id IN [" + ", ".join(f'"{i:020d}"' for i in range(1_500)) + "]"  # 1 condition, 36 kB
    for text, expected in [
        (huge, f"a rule text is at most {MAX_RULE_TEXT_LENGTH} characters, this one has {len(huge)}"),
        (many, f"a rule has at most {MAX_RULE_CONDITIONS} conditions, this one has {MAX_RULE_CONDITIONS + 1}"),
        (long_list, f"a rule text is at most {MAX_RULE_TEXT_LENGTH} characters"),
    ]:
        code, _, fields = failure(segmentation.ParseSegmentRule, pb.ParseSegmentRuleRequest(rule_text=text))
        assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["rule_text"])
        assert fields["rule_text"].startswith(expected), fields
        code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
            segment_id="too-big", segment=pb.Segment(rule_text=text)))
        assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment.rule_text"])
        assert fields["segment.rule_text"].startswith(expected), fields
    # The tree form: the same conditions, and a list whose canonical text would be too long to send back.
    many_tree = pb.Rule(any=pb.RuleGroup(rules=[
        pb.Rule(trait=pb.TraitCondition(field="traits.a", operator=pb.OPERATOR_EQUAL,
                                        value=struct_pb2.Value(number_value=i)))
        for i in range(MAX_RULE_CONDITIONS + 1)]))
    list_tree = pb.Rule(trait=pb.TraitCondition(field="traits.id", operator=pb.OPERATOR_IN, values=[
        struct_pb2.Value(string_value=f"{i:020d}") for i in range(1_500)]))
    for rule, expected in [(many_tree, f"a rule has at most {MAX_RULE_CONDITIONS} conditions"),
                           (list_tree, f"a rule's text is at most {MAX_RULE_TEXT_LENGTH} characters")]:
        code, _, fields = failure(segmentation.CreateSegment, pb.CreateSegmentRequest(
            segment_id="too-big", segment=pb.Segment(rule=rule)))
        assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment.rule"])
        assert fields["segment.rule"].startswith(expected), fields
    # An update is held to the same limits; nothing was stored.
    create(segmentation, "small", "traits.a = 1")
    code, _, fields = failure(segmentation.UpdateSegment, pb.UpdateSegmentRequest(
        segment=pb.Segment(name="segments/small", rule_text=many), update_mask=field_mask_pb2.FieldMask(
            paths=["rule_text"])))
    assert (code, list(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["segment.rule_text"])
    names = [s.name for s in segmentation.ListSegments(pb.ListSegmentsRequest(), timeout=10).segments]
    assert names == ["segments/small"]


def test_rules_at_the_limits_are_stored_and_read_back(segmentation: Stub) -> None:
    deepest = create(segmentation, "deepest", DEEPEST)
    largest = create(segmentation, "largest", f'event("order").count(last 9d) BETWEEN 0 AND {LARGEST_COUNT}')
    create(segmentation, "largest-trait", f"traits.age BETWEEN -{MAX_NUMBER} AND {MAX_NUMBER}")
    widest = " OR ".join(f"traits.a = {i}" for i in range(MAX_RULE_CONDITIONS))
    assert create(segmentation, "widest", widest).rule_text == widest
    assert deepest.rule_text == DEEPEST
    assert largest.rule.event_count.count_upper == LARGEST_COUNT
    listed = segmentation.ListSegments(pb.ListSegmentsRequest(), timeout=10)
    assert {s.name: s.rule_text for s in listed.segments} == {
        "segments/deepest": DEEPEST,
        "segments/largest": 'event("order").count(last 9d) BETWEEN 0 AND 9.223372036854775e+18',
        "segments/largest-trait": "traits.age BETWEEN -9007199254740991.0 AND 9007199254740991.0",
        "segments/widest": widest}
    assert segmentation.GetSegment(pb.GetSegmentRequest(name="segments/largest"), timeout=10).rule == largest.rule
