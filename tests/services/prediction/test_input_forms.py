"""Pure validation of what callers type: resource names with non-ASCII digits or a final newline, control
characters in labels, malformed person selectors, and the one limit a too-late validation horizon is judged by."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from services.prediction.history import PersonRef, RefsByPersonId
from services.prediction.profile_source import (
    RefusedSelector,
    raise_refused_selectors,
    refused_selector_violations,
    selector_violations,
)
from services.prediction.spec import (
    MODEL_ID,
    PredictionKind,
    check_model_id,
    display_name_violations,
    parse_model_name,
    parse_version_name,
    resolve_spec,
)
from services.prediction.training import check_horizon_reachable
from shared.errors import FailedPrecondition, InvalidArgument, NotFound

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("number", ["\u00b2", "\u0661", "\u0662", "1\u0660", "\uff11", "\u09e7", "\U0001d7cf"])
def test_a_version_number_is_ascii_digits_only(number: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_version_name(f"models/conv90/versions/{number}", "model_version")
    assert caught.value.reason == "BAD_RESOURCE_NAME"
    assert [v.field for v in caught.value.field_violations] == ["model_version"]


def test_ascii_version_numbers_still_parse() -> None:
    assert parse_version_name("models/conv90/versions/1") == ("conv90", 1)
    assert parse_version_name("models/conv90/versions/999999999") == ("conv90", 999_999_999)
    for bad in ("0", "01", "1234567890", "-1", "+1", " 1", "1 ", ""):
        with pytest.raises(InvalidArgument):
            parse_version_name(f"models/conv90/versions/{bad}")


@pytest.mark.parametrize("name", ["models/x1\n", "models/x1/versions/1\n", "models/x1\n/versions/1"])
def test_a_name_ending_in_a_newline_is_no_name(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_version_name(name) if "versions" in name else parse_model_name(name)
    assert caught.value.reason in ("BAD_RESOURCE_NAME", "BAD_MODEL_ID")


def test_a_model_id_ending_in_a_newline_is_no_model_id() -> None:
    with pytest.raises(InvalidArgument):
        check_model_id("x1\n")
    # The server's own check applies the pattern with .match: it must not take the newline either.
    assert MODEL_ID.match("x1\n") is None and MODEL_ID.match("x1") is not None


@pytest.mark.parametrize("char", ["\x00", "\n", "\t", "\x1f", "\x7f", "\x85"])
def test_control_characters_are_refused_in_labels(char: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(PredictionKind.CONVERSION, ["order", f"sign{char}up"], 30, eligibility_days=0,
                     min_class_count=0)
    violations = caught.value.field_violations
    assert [v.field for v in violations] == ["model.spec.event_names[1]"]
    assert f"control character U+{ord(char):04X} at position 4" in violations[0].description
    (violation,) = display_name_violations(f"Buy{char}ers")
    assert violation.field == "model.display_name"
    assert f"U+{ord(char):04X} at position 3" in violation.description
    assert display_name_violations("Buyers \u00e9t\u00e9 \U0001f600") == []


def test_malformed_selectors_are_named_before_any_read() -> None:
    persons = [PersonRef(person_id="p_01abc"), PersonRef(person_id="bad!"),
               PersonRef(identifier_type="crm_id", identifier_value="otp-00005"),
               PersonRef(identifier_type="No Such", identifier_value="v"), PersonRef(person_id="p_x\n")]
    violations = selector_violations(persons)
    assert [v.field for v in violations] == ["persons[1]", "persons[3]", "persons[4]"]
    assert "is not a person id" in violations[0].description
    assert "is not an identifier type" in violations[1].description
    # A batch of person ids is checked in one pass, and names the bad ones just the same.
    assert selector_violations(RefsByPersonId(["p_1", "p_2"] * 5000)) == []
    ids = RefsByPersonId(["p_1", "p_2\np_3", "P_4", "p_5"])
    assert [v.field for v in selector_violations(ids, "requests[2].batch.persons")] == [
        "requests[2].batch.persons[1]", "requests[2].batch.persons[2]"]


def test_selectors_profile_refused_fail_the_call_naming_each() -> None:
    errors = {4: RefusedSelector("unknown identifier type 'nosuch'"), 1: NotFound("no person matches"),
              2: RefusedSelector("not an email address")}
    assert [v.field for v in refused_selector_violations(errors)] == ["persons[2]", "persons[4]"]
    with pytest.raises(InvalidArgument) as caught:
        raise_refused_selectors(errors, "requests[0].batch.persons")
    assert [v.field for v in caught.value.field_violations] == ["requests[0].batch.persons[2]",
                                                               "requests[0].batch.persons[4]"]
    assert "unknown identifier type 'nosuch'" in caught.value.message
    raise_refused_selectors({1: NotFound("no person matches")})  # nobody refused: nothing to fail


_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?\+00:00")


def test_a_horizon_beyond_the_data_states_one_limit() -> None:
    """The message and each field violation name the same latest horizon end (was: now + 1 day in the message,
    now + 2 days in the violations)."""
    spec = resolve_spec(PredictionKind.CONVERSION, [], 90, eligibility_days=0, min_class_count=0)
    now = datetime(2026, 11, 25, 4, 44, tzinfo=UTC)
    validation = datetime(2026, 11, 1, tzinfo=UTC)
    training = [datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC)]
    with pytest.raises(FailedPrecondition) as caught:
        check_horizon_reachable(spec, training, validation, now)
    error = caught.value
    limit = now + timedelta(days=2)
    horizon_end = validation + timedelta(days=90)
    assert set(_TIME.findall(error.message)) == {horizon_end.isoformat(), limit.isoformat()}
    assert [v.field for v in error.field_violations] == ["validation_cutoff", "training_cutoffs[1]"]
    for violation, cutoff in zip(error.field_violations, [validation, training[1]], strict=True):
        assert set(_TIME.findall(violation.description)) == {
            cutoff.isoformat(), (cutoff + timedelta(days=90)).isoformat(), limit.isoformat()}
    assert error.metadata["latest_possible_horizon_end"] == limit.isoformat()
    check_horizon_reachable(spec, training[:1], limit - timedelta(days=90), now)  # ending at the limit passes
