"""Identifier types: how values of each type are normalized, validated and recognised as junk.

Normalization happens before anything is compared or stored, so `Ada@Example.com ` and
`ada@example.com` are one identifier, and `+86 138 0013 8000`, `0086 138 0013 8000` and `+8613800138000`
are one phone. A phone's extension is dropped (E.164 has none): `+1 650 253 0000 ext. 123` is `+16502530000`.
"""

from __future__ import annotations

import logging
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import phonenumbers
import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from shared.errors import control_character_problem


class Normalization(Enum):
    TRIM = "trim"
    EXACT = "exact"
    LOWERCASE = "lowercase"
    EMAIL = "email"
    PHONE_E164 = "phone_e164"  # E.164, without an extension (see _normalize_phone)
    DEVICE_ID = "device_id"


log = logging.getLogger(__name__)


class InvalidIdentifierValue(ValueError):
    """The value is malformed for its type; the message says how."""


class InvalidPattern(ValueError):
    """A blocked pattern RE2 cannot compile; the message says why."""


class CompiledPattern(Protocol):
    def search(self, text: str) -> object | None: ...


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the caller's error, answered; not a line on stderr
# The default patterns (DEFAULT_BLOCKED_PATTERNS) RE2 cannot compile (a backreference) are run by re:
# anchored at the start, so a search tries one position, and each backtracking step gives back one
# repetition: linear in the value's length. Only these exact strings; a caller's pattern always goes to RE2.
_BUILT_IN_BACKTRACKING_PATTERNS = frozenset({r"^(.)\1{5,}$"})


def compile_pattern(pattern: str) -> CompiledPattern:
    """A blocked pattern compiled by RE2, which matches in time linear in the value's length whatever the
    pattern: a backtracking engine (Python's re) takes exponential time on patterns like ^(a+)+$, so a
    pattern a caller sends would be a way to stall the identity process. InvalidPattern when RE2 cannot
    compile it (backreferences, lookaround). The built-in patterns RE2 cannot express are run by re: they
    are anchored and linear under backtracking too."""
    if pattern in _BUILT_IN_BACKTRACKING_PATTERNS:
        return re.compile(pattern)
    try:
        return re2.compile(pattern, _RE2_OPTIONS)  # type: ignore[no-any-return]
    except re2.error as error:
        detail = error.args[0] if error.args else ""
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        raise InvalidPattern(detail) from error


def compile_stored_patterns(patterns: Iterable[str], owner: str) -> tuple[CompiledPattern, ...]:
    """Patterns already stored, compiled by RE2; one stored before patterns had to be RE2 syntax that RE2
    cannot compile is compiled by Python's re, with a warning naming it.

    Why not refuse it, or drop it: refusing would fail the whole settings document it is in, so every
    process would keep older settings (or the defaults) and lose the operator's other types and rules;
    dropping it would let the junk values it blocks link persons, and merges are not undone by fixing the
    pattern afterwards. The old code ran such a pattern already, so running it keeps things as they were
    until an operator replaces it; any update of its type or of the policy must do so (new patterns are
    checked by compile_pattern) and the warning says which."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(compile_pattern(pattern))
        except InvalidPattern as error:
            log.warning("a stored blocked pattern is not RE2 syntax: it runs on Python's re, which can take "
                        "exponential time on some values; replace it with an RE2 pattern",
                        extra={"owner": owner, "pattern": pattern, "error": str(error)})
            compiled.append(re.compile(pattern))
    return tuple(compiled)


TYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")  # whole names only: fullmatch (`$` also matches before a final newline)
MAX_VALUE_BYTES = 512
# Deliberately permissive local part (RFC 5322 and 6531 allow much), strict shape: local@label(.label)+ with a
# TLD, the domain in its ASCII (IDNA) form.
_EMAIL = re.compile(r"^[^\s@]{1,64}@(?=.{4,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
                    r"(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})$")
_MAILTO = "mailto:"


@dataclass(frozen=True)
class IdentifierType:
    type: str
    normalization: Normalization
    display_name: str = ""
    priority: int = 100
    max_per_person: int = 0
    blocked_values: frozenset[str] = frozenset()
    blocked_patterns: tuple[str, ...] = ()
    hash_values: bool = False
    built_in: bool = False
    _compiled: tuple[CompiledPattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not TYPE_NAME.fullmatch(self.type):
            raise ValueError(f"identifier type {self.type!r} must be lower_snake_case, 1-63 characters")
        object.__setattr__(self, "_compiled", compile_stored_patterns(
            self.blocked_patterns, f"identifier type {self.type}"))

    def normalize(self, value: str, *, default_phone_region: str | None = None) -> str:
        """The canonical form of `value`, or InvalidIdentifierValue saying what is wrong."""
        text = unicodedata.normalize("NFKC", value).strip()
        if not text:
            raise InvalidIdentifierValue("must not be empty")
        if len(text.encode()) > MAX_VALUE_BYTES:
            raise InvalidIdentifierValue(f"must be at most {MAX_VALUE_BYTES} bytes")
        # Surrounding white space (tabs, line breaks) is trimmed above; one inside a value (NUL, ESC, a line
        # break) is a client's encoding bug, and would be stored, hashed and shown back as such.
        if problem := control_character_problem(text):
            raise InvalidIdentifierValue(problem)
        match self.normalization:
            case Normalization.TRIM | Normalization.EXACT:
                return text
            case Normalization.LOWERCASE:
                return text.lower()
            case Normalization.EMAIL:
                return _normalize_email(text)
            case Normalization.PHONE_E164:
                return _normalize_phone(text, default_phone_region)
            case Normalization.DEVICE_ID:
                return _normalize_device_id(text)

    def is_blocked(self, normalized: str) -> bool:
        return normalized in self.blocked_values or any(p.search(normalized) for p in self._compiled)


def _normalize_email(text: str) -> str:
    shown = text
    # A `mailto:` URI (copied from a link) names the address it holds, as `tel:` does a phone number.
    if text[:len(_MAILTO)].lower() == _MAILTO:
        text = text[len(_MAILTO):]
    local, at, domain = text.rpartition("@")
    if at and not (len(local) >= 2 and local.startswith('"') and local.endswith('"')):
        # An unquoted local part is a dot-atom (RFC 5322 section 3.2.3): dots only between characters.
        if local.startswith("."):
            raise InvalidIdentifierValue(f"{shown!r} is not an email address: the part before @ starts with a dot")
        if local.endswith("."):
            raise InvalidIdentifierValue(f"{shown!r} is not an email address: the part before @ ends with a dot")
        if ".." in local:
            raise InvalidIdentifierValue(f"{shown!r} is not an email address: the part before @ has two dots in "
                                         "a row")
    if at and not domain.isascii():
        # An internationalized domain (例子.中国, exämple.de) is one identifier with its ASCII form
        # (xn--fsqu00a.xn--fiqs8s), which is how it is stored; the local part stays as written (RFC 6531).
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as error:
            raise InvalidIdentifierValue(f"{shown!r} is not an email address: its domain is not a valid "
                                         "internationalized domain name") from error
    email = f"{local}@{domain}".lower() if at else text.lower()
    if not _EMAIL.match(email):
        raise InvalidIdentifierValue(f"{shown!r} is not an email address (expected local@domain.tld)")
    return email


# What each of libphonenumber's parse errors means for the caller.
_PHONE_PARSE_ERRORS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "its country code is missing or unknown",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "it does not look like a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "it is too short after the international prefix",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "it is too short",
    phonenumbers.NumberParseException.TOO_LONG: "it is too long",
}


def _normalize_phone(text: str, default_region: str | None) -> str:
    """The number in E.164 (`+` country code and national number); an extension (`ext. 123`, `x123`,
    `;ext=123`) is dropped, for E.164 has none: `+1 650 253 0000 ext. 123` is the identifier `+16502530000`.

    A leading `00`, the international call prefix of China and most of Europe (ITU-T E.164's recommended
    one), reads as `+` when the number does not read otherwise: without a default region it would have no
    country code, and no national number of a region whose own prefix differs starts with it. A region's
    own prefix (0011 in Australia, 011 in North America) still reads through that region's rules."""
    try:
        return _e164(text, text, default_region)
    except InvalidIdentifierValue:
        if not text.startswith("00"):
            raise
    return _e164("+" + text.removeprefix("00"), text, None)


def _e164(text: str, shown: str, default_region: str | None) -> str:
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else default_region)
    except phonenumbers.NumberParseException as error:
        reason = _PHONE_PARSE_ERRORS.get(error.error_type, "it cannot be parsed")
        hint = "" if text.startswith("+") or default_region else \
            "; write national numbers with their +country prefix, e.g. +8613800138000"
        raise InvalidIdentifierValue(f"{shown!r} is not a phone number: {reason}{hint}") from error
    if not phonenumbers.is_possible_number(number):
        raise InvalidIdentifierValue(f"{shown!r} is not a possible phone number")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _normalize_device_id(text: str) -> str:
    # Advertising ids (IDFA, AAID, OAID, IDFV) are UUIDs; compare them in one canonical form.
    try:
        return str(uuid.UUID(text)).upper()
    except ValueError:
        pass
    # Other device ids (e.g. Android ids, 16 hex digits) are compared case-insensitively.
    if re.fullmatch(r"[0-9A-Za-z_\-:.]{4,128}", text):
        return text.upper()
    raise InvalidIdentifierValue(f"{text!r} is not a device id (expected a UUID or 4-128 of [0-9A-Za-z_-:.])")


def _type(name: str, normalization: Normalization, display_name: str, priority: int, *,
          max_per_person: int = 0, blocked_patterns: tuple[str, ...] = ()) -> IdentifierType:
    return IdentifierType(name, normalization, display_name, priority, max_per_person,
                          blocked_patterns=blocked_patterns, built_in=True)


# Priorities: durable, person-owned ids outrank device- and browser-scoped ones.
BUILT_IN_TYPES: Mapping[str, IdentifierType] = {t.type: t for t in (
    _type("crm_id", Normalization.EXACT, "CRM id", 200, max_per_person=1),
    _type("account_id", Normalization.EXACT, "App account id", 190, max_per_person=1),
    _type("wechat_unionid", Normalization.EXACT, "WeChat unionid", 180, max_per_person=1),
    _type("email", Normalization.EMAIL, "Email address", 150),
    # E.164: a leading 00 reads as +, and an extension is dropped (see _normalize_phone).
    _type("phone", Normalization.PHONE_E164, "Phone number (E.164)", 150),
    _type("wechat_openid", Normalization.EXACT, "WeChat openid (per app)", 120),
    _type("device_id", Normalization.DEVICE_ID, "Device id (IDFA/AAID/IDFV/OAID)", 60,
          blocked_patterns=(r"^[0-]+$",)),
    _type("cookie", Normalization.EXACT, "Browser cookie id", 20),
)}

# Junk that clients send when they have no real value; compared case-insensitively.
DEFAULT_BLOCKED_VALUES: frozenset[str] = frozenset({
    "unknown", "null", "nil", "none", "undefined", "anonymous", "anon", "guest", "test", "n/a", "na",
    "-1", "0", "[object object]", "nan", "false", "true", "empty", "default",
})
DEFAULT_BLOCKED_PATTERNS: tuple[str, ...] = (
    r"^0+$",                         # all zeros, e.g. 000000
    r"^[0\-]{8,}$",                  # zero UUIDs
    r"^(.)\1{5,}$",                  # one repeated character: xxxxxx, 111111
    r"^(?i:test|demo|example)@",     # placeholder emails
)


@dataclass(frozen=True)
class GuardPolicy:
    """Junk values of any type, and the rules that mark an identifier as shared."""

    blocked_values: frozenset[str] = DEFAULT_BLOCKED_VALUES
    blocked_patterns: tuple[str, ...] = DEFAULT_BLOCKED_PATTERNS
    # (shared type, counted type) -> the most distinct counted values a non-shared identifier is seen with.
    shared_identifier_limits: Mapping[tuple[str, str], int] = field(default_factory=lambda: {
        ("device_id", "account_id"): 3,
        ("cookie", "account_id"): 3,
        ("device_id", "crm_id"): 3,
    })
    _compiled: tuple[CompiledPattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", compile_stored_patterns(self.blocked_patterns, "the guard policy"))

    def is_junk(self, identifier_type: IdentifierType, normalized: str) -> bool:
        return (normalized.lower() in self.blocked_values or any(p.search(normalized) for p in self._compiled)
                or identifier_type.is_blocked(normalized))


class IdentifierRegistry:
    """The identifier types in force: built-in plus custom ones."""

    def __init__(self, types: Iterable[IdentifierType] = (), default_phone_region: str | None = None) -> None:
        self._types = dict(BUILT_IN_TYPES)
        self._types.update({t.type: t for t in types})
        self.default_phone_region = default_phone_region

    def get(self, name: str) -> IdentifierType | None:
        return self._types.get(name)

    def all(self) -> list[IdentifierType]:
        return sorted(self._types.values(), key=lambda t: t.type)

    def normalize(self, type_name: str, value: str) -> str:
        identifier_type = self._types.get(type_name)
        if identifier_type is None:
            known = ", ".join(sorted(self._types))
            raise InvalidIdentifierValue(f"unknown identifier type {type_name!r}; known types: {known}")
        return identifier_type.normalize(value, default_phone_region=self.default_phone_region)
