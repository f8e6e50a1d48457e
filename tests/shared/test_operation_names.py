"""One parser of operation names for every service (shared.longrunning.operation_id_of): the id of
`operations/{id}`, or INVALID_ARGUMENT naming the field with reason INVALID_OPERATION_NAME and the form
expected. Both services' GetOperation over real gRPC: tests/services/segmentation/test_segmentation_longrunning.py."""

from __future__ import annotations

import pytest

from shared.errors import FieldViolation, InvalidArgument
from shared.longrunning import operation_id_of

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("name", "operation_id"), [
    ("operations/0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    ("operations/A_b-9", "A_b-9"),
    ("operations/" + "x" * 64, "x" * 64),
])
def test_the_id_of_an_operation_name(name: str, operation_id: str) -> None:
    assert operation_id_of(name) == operation_id


@pytest.mark.parametrize("name", [
    "", "ops/1", "operations/", "operations", "operations/a/b", "operations/a b", "/operations/a",
    "operations/" + "x" * 65,
    "operations/abc\n",  # a regex's `$` matches before a final newline: the id would be "abc"
    "operations/" + "x" * 70_000,
])
def test_anything_else_is_invalid_naming_the_field_and_the_expected_form(name: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        operation_id_of(name, "request.name")
    error = raised.value
    assert error.reason == "INVALID_OPERATION_NAME"
    [violation] = error.field_violations
    assert violation == FieldViolation("request.name", violation.description)
    assert "expected operations/{id}" in violation.description and repr(name[:200]) in violation.description
    assert len(error.message) < 500  # a huge name is cut, not echoed whole
