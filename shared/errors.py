"""Domain errors: what went wrong, in terms a caller can act on.

Domain code raises these and never imports grpc; the server interceptor (shared.server) turns them
into a gRPC status carrying a google.rpc.ErrorInfo and, for bad input, BadRequest field violations.
Each class names the status code it maps to, following Feast's errors.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from unicodedata import category


def error_domain(service: str) -> str:
    """ErrorInfo.domain of every error service `service` reports (its ServiceDefinition.name): the runner's
    server sets it on synchronous statuses and the service on its operations' errors, both from here."""
    return f"onecdp.{service}"


class StatusCode(StrEnum):
    """The gRPC status codes domain code may use (names match grpc.StatusCode)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is a path like `observations[3].identifiers[1].value`."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error a service reports to its callers."""

    code: StatusCode = StatusCode.FAILED_PRECONDITION

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        # ErrorInfo.reason: UPPER_SNAKE_CASE, stable, machine-readable (AIP-193).
        self.reason = reason or self.code.value
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)


class InvalidArgument(DomainError):
    code = StatusCode.INVALID_ARGUMENT

    @classmethod
    def for_field(cls, field_path: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
        """The error for one bad field, with its field violation."""
        return cls(f"{field_path}: {description}", reason=reason,
                   field_violations=[FieldViolation(field_path, description)])


class NotFound(DomainError):
    code = StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    code = StatusCode.FAILED_PRECONDITION


class Aborted(DomainError):
    code = StatusCode.ABORTED


class ResourceExhausted(DomainError):
    code = StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DomainError):
    code = StatusCode.UNAVAILABLE


class DeadlineExceeded(DomainError):
    code = StatusCode.DEADLINE_EXCEEDED


class NotImplementedYet(DomainError):
    code = StatusCode.UNIMPLEMENTED


@dataclass
class Violations:
    """Collects every bad field of a request, so one INVALID_ARGUMENT names all of them at once."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def check(self, ok: bool, field_path: str, description: str) -> bool:
        if not ok:
            self.add(field_path, description)
        return ok

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, summary: str = "the request has invalid fields", reason: str = "INVALID_FIELDS") -> None:
        if self.items:
            details = "; ".join(f"{v.field}: {v.description}" for v in self.items[:5])
            more = f" (and {len(self.items) - 5} more)" if len(self.items) > 5 else ""
            raise InvalidArgument(f"{summary}: {details}{more}", reason=reason, field_violations=self.items)


# Names and descriptions people give resources, shown in lists: bounded, so that a resource stays small (a 5 MB
# description made every page of segments holding it pass a client's 4 MiB default message limit).
MAX_DISPLAY_NAME_LENGTH = 256
MAX_DESCRIPTION_LENGTH = 4096


def check_display_name(violations: Violations, display_name: str, field_path: str,
                       limit: int = MAX_DISPLAY_NAME_LENGTH) -> None:
    """A display name is at most `limit` characters, with no control character (it is shown on one line)."""
    violations.check(len(display_name) <= limit, field_path, f"at most {limit:,} characters, got {len(display_name):,}")
    if problem := control_character_problem(display_name):
        violations.add(field_path, problem)


def check_description(violations: Violations, description: str, field_path: str,
                      limit: int = MAX_DESCRIPTION_LENGTH) -> None:
    """A description is at most `limit` characters; line breaks and tabs are the only control characters it holds."""
    violations.check(len(description) <= limit, field_path, f"at most {limit:,} characters, got {len(description):,}")
    control = next((char for char in description if char not in "\n\r\t" and category(char) == "Cc"), None)
    if control is not None:
        violations.add(field_path, "must not contain control characters other than line breaks and tabs; found "
                                   f"control character U+{ord(control):04X} at position {description.index(control)}")


def control_character_problem(text: str) -> str | None:
    """Why `text` cannot be taken as a name, label or identifier value: it holds a control character (Unicode
    category Cc: U+0000-U+001F, U+007F-U+009F), a client's encoding bug that would be stored and shown back as
    such. None when it holds none. Worded the same wherever a service refuses one."""
    control = next((char for char in text if category(char) == "Cc"), None)
    if control is None:
        return None
    return (f"must not contain control characters; found control character U+{ord(control):04X} at position "
            f"{text.index(control)}")
