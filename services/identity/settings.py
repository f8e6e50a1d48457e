"""The identifier types and guard policy in force: stored in `settings`, shared by every identity process.

Two rows of the `settings` table hold them as JSON documents: `identifier_types` (custom types, and
built-in types an operator changed) and `guard_policy`. A row's `etag` column is a write version that
every change compares-and-sets (a lightweight transaction), so concurrent updaters, in one process or
many, never lose each other's changes. The etags clients see are digests of each resource's content
(strong etags, AIP-154): a stale one is refused with ABORTED.

The process that handles a change installs it on its IdentityGraph at once; every other process reads
both rows again every RELOAD_INTERVAL_SECONDS and installs what changed, so a change is in force in
every process within that bound. Nothing sweeps the graph on a change: identifiers already linked are
judged again under the new settings when their component is next recomputed, i.e. when new evidence
(a link or an unlink) touches them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from services.identity.identifiers import (
    BUILT_IN_TYPES,
    MAX_VALUE_BYTES,
    TYPE_NAME,
    GuardPolicy,
    IdentifierRegistry,
    IdentifierType,
    InvalidIdentifierValue,
    InvalidPattern,
    Normalization,
    compile_pattern,
)
from shared.cassandra import SERIAL_CONSISTENCY, CassandraSession
from shared.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, Unavailable, Violations, check_display_name
from shared.etags import etag_matches, strong_etag

log = logging.getLogger(__name__)

TYPES_ROW = "identifier_types"
POLICY_ROW = "guard_policy"
TYPE_NAME_PREFIX = "identifierTypes/"
POLICY_NAME = "guardPolicy"
# How stale another process's settings may be: a change is in force everywhere this long after it is stored.
RELOAD_INTERVAL_SECONDS = 2.0
MAX_WRITE_ATTEMPTS = 16  # each failed attempt means another writer succeeded; settings writers are few

DEFAULT_PRIORITY = 100
MAX_PRIORITY = 1000
MAX_PER_PERSON = 1000
MAX_TYPE_DISPLAY_NAME_LENGTH = 128
MAX_BLOCKED_VALUES = 1000
MAX_PATTERNS = 50
MAX_PATTERN_LENGTH = 256
MAX_SHARED_RULES = 50
MAX_DISTINCT = 1000

UPDATABLE_TYPE_FIELDS = ("display_name", "priority", "max_per_person", "blocked_values", "blocked_patterns")
IMMUTABLE_TYPE_FIELDS = ("type", "normalization", "hash_values")
UPDATABLE_POLICY_FIELDS = ("blocked_values", "blocked_patterns", "shared_identifier_rules")
OUTPUT_ONLY_FIELDS = ("name", "built_in", "etag")

Result = TypeVar("Result")


class SettingsHolder(Protocol):
    """What the settings are installed on: the IdentityGraph reads both attributes on every operation."""

    registry: IdentifierRegistry
    policy: GuardPolicy


@dataclass(frozen=True)
class TypeDraft:
    """An identifier type as a caller asked for it, not yet validated. `normalization` is None for a
    value the caller sent that names no normalization."""

    type: str
    normalization: Normalization | None = Normalization.TRIM
    display_name: str = ""
    priority: int = 0
    max_per_person: int = 0
    blocked_values: tuple[str, ...] = ()
    blocked_patterns: tuple[str, ...] = ()
    hash_values: bool = False


@dataclass(frozen=True)
class SharedRule:
    identifier_type: str
    distinct_type: str
    max_distinct: int


@dataclass(frozen=True)
class PolicyDraft:
    """A guard policy as a caller asked for it, not yet validated."""

    blocked_values: tuple[str, ...] = ()
    blocked_patterns: tuple[str, ...] = ()
    shared_identifier_rules: tuple[SharedRule, ...] = ()


@dataclass(frozen=True)
class _Row:
    generation: int  # counts the row's writes: a process never installs an older row over a newer one
    version: str     # the `etag` column, compared-and-set by every write
    body: Mapping[str, Any] = field(default_factory=dict)


# ---- documents and etags ---------------------------------------------------------------------------

def _type_document(identifier_type: IdentifierType) -> dict[str, Any]:
    return {"normalization": identifier_type.normalization.value, "display_name": identifier_type.display_name,
            "priority": identifier_type.priority, "max_per_person": identifier_type.max_per_person,
            "blocked_values": sorted(identifier_type.blocked_values),
            "blocked_patterns": list(identifier_type.blocked_patterns), "hash_values": identifier_type.hash_values}


def _type_from_document(name: str, document: Mapping[str, Any]) -> IdentifierType:
    return IdentifierType(
        name, Normalization(document["normalization"]), document["display_name"], document["priority"],
        document["max_per_person"], frozenset(document["blocked_values"]), tuple(document["blocked_patterns"]),
        document["hash_values"], built_in=name in BUILT_IN_TYPES)


def _policy_document(policy: GuardPolicy) -> dict[str, Any]:
    return {"blocked_values": sorted(policy.blocked_values), "blocked_patterns": list(policy.blocked_patterns),
            "shared_identifier_rules": sorted([shared, counted, limit] for (shared, counted), limit
                                              in policy.shared_identifier_limits.items())}


def _policy_from_document(document: Mapping[str, Any]) -> GuardPolicy:
    return GuardPolicy(frozenset(document["blocked_values"]), tuple(document["blocked_patterns"]),
                       {(shared, counted): limit for shared, counted, limit in document["shared_identifier_rules"]})


def _digest(document: Mapping[str, Any]) -> str:
    # Equal content, equal etag, in every process.
    return strong_etag(hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:_DIGEST_LENGTH])


_DIGEST_LENGTH = 24
_ETAG_OPAQUE = re.compile(f"[0-9a-f]{{{_DIGEST_LENGTH}}}")


def _check_etag_form(etag: str, field_path: str) -> None:
    """InvalidArgument naming `field_path` for an etag this service never issues: it could match no version,
    so calling it stale (ABORTED, read again and retry) would send the caller round a loop that cannot end.
    Quoted or bare, as shared.etags.etag_matches compares them."""
    if not etag or _ETAG_OPAQUE.fullmatch(etag.strip().strip('"')):
        return
    weak = " (a weak W/ etag; updates need the strong one)" if etag.lstrip().startswith("W/") else ""
    raise InvalidArgument.for_field(field_path, f"{etag!r} is not an etag this service issues{weak}; send the one "
                                    "the last Get or update returned, exactly as shown, or none for an "
                                    "unconditional update", reason="INVALID_ETAG")


def type_etag(identifier_type: IdentifierType) -> str:
    return _digest({"type": identifier_type.type, **_type_document(identifier_type)})


def policy_etag(policy: GuardPolicy) -> str:
    return _digest(_policy_document(policy))


def registry_from(stored_types: Mapping[str, Mapping[str, Any]],
                  default_phone_region: str | None) -> IdentifierRegistry:
    return IdentifierRegistry([_type_from_document(name, document) for name, document in sorted(stored_types.items())],
                              default_phone_region=default_phone_region)


# ---- validation ------------------------------------------------------------------------------------

def _check_patterns(patterns: Sequence[str], path: str, violations: Violations) -> None:
    violations.check(len(patterns) <= MAX_PATTERNS, path, f"at most {MAX_PATTERNS} patterns")
    for index, pattern in enumerate(patterns):
        where = f"{path}[{index}]"
        if not violations.check(0 < len(pattern) <= MAX_PATTERN_LENGTH, where,
                                f"a pattern is 1-{MAX_PATTERN_LENGTH} characters"):
            continue
        try:
            compiled = compile_pattern(pattern)
        except InvalidPattern as error:
            violations.add(where, f"{pattern!r} is not a valid regular expression in RE2 syntax ({error}); "
                           "patterns are RE2 (https://github.com/google/re2/wiki/Syntax), which matches in linear "
                           "time and so has no backreferences (\\1) or lookaround ((?=...), (?<=...))")
            continue
        # A pattern that matches the empty string is found in (nearly) every value and would block them all.
        violations.check(compiled.search("") is None, where,
                         f"{pattern!r} matches the empty string, so it would block almost every value; "
                         "make it match at least one character, e.g. ^x+$ instead of ^x*$")


def _check_values(values: Sequence[str], path: str, violations: Violations,
                  canonical: Callable[[str], str]) -> frozenset[str]:
    violations.check(len(values) <= MAX_BLOCKED_VALUES, path, f"at most {MAX_BLOCKED_VALUES} values")
    result: set[str] = set()
    for index, value in enumerate(values):
        try:
            result.add(canonical(value))
        except InvalidIdentifierValue as error:
            violations.add(f"{path}[{index}]", f"{value!r}: {error}")
    return frozenset(result)


def validated_type(draft: TypeDraft, *, path: str, default_phone_region: str | None,
                   display_name_given: bool = True) -> IdentifierType:
    """The identifier type `draft` describes; InvalidArgument naming every bad field otherwise. The display name
    is checked when the caller gives it (`display_name_given`): one stored before control characters were refused
    in it must not fail an update of another field."""
    violations = Violations()
    violations.check(TYPE_NAME.fullmatch(draft.type) is not None, f"{path}.type",
                     "lower_snake_case: a letter, then letters, digits or _, 1-63 characters")
    violations.check(draft.normalization is not None, f"{path}.normalization",
                     "not a known normalization; use one of " + ", ".join(
                         f"NORMALIZATION_{n.name}" for n in Normalization if n is not Normalization.TRIM))
    if display_name_given:
        check_display_name(violations, draft.display_name, f"{path}.display_name", MAX_TYPE_DISPLAY_NAME_LENGTH)
    violations.check(0 <= draft.priority <= MAX_PRIORITY, f"{path}.priority",
                     f"0-{MAX_PRIORITY}; 0 means the default, {DEFAULT_PRIORITY}")
    violations.check(0 <= draft.max_per_person <= MAX_PER_PERSON, f"{path}.max_per_person",
                     f"0-{MAX_PER_PERSON}; 0 means unlimited")
    violations.check(not draft.hash_values, f"{path}.hash_values",
                     "storing a type's values as salted hashes is not supported yet; leave hash_values unset")
    normalization = draft.normalization or Normalization.TRIM
    # A blocked value is compared with normalized values, so it is normalized like one (and must be one).
    probe = IdentifierType("probe", normalization)
    blocked_values = _check_values(
        draft.blocked_values, f"{path}.blocked_values", violations,
        lambda value: probe.normalize(value, default_phone_region=default_phone_region))
    _check_patterns(draft.blocked_patterns, f"{path}.blocked_patterns", violations)
    violations.raise_if_any("the identifier type is invalid", reason="INVALID_IDENTIFIER_TYPE")
    return IdentifierType(draft.type, normalization, draft.display_name, draft.priority or DEFAULT_PRIORITY,
                          draft.max_per_person, blocked_values, tuple(dict.fromkeys(draft.blocked_patterns)),
                          draft.hash_values, built_in=draft.type in BUILT_IN_TYPES)


def _canonical_junk(value: str) -> str:
    # Guard-policy values match any type's normalized values, case-insensitively (GuardPolicy.is_junk).
    text = unicodedata.normalize("NFKC", value).strip().lower()
    if not text:
        raise InvalidIdentifierValue("must not be empty")
    if len(text.encode()) > MAX_VALUE_BYTES:
        raise InvalidIdentifierValue(f"must be at most {MAX_VALUE_BYTES} bytes")
    return text


def validated_policy(draft: PolicyDraft, registry: IdentifierRegistry, *, path: str) -> GuardPolicy:
    """The guard policy `draft` describes; InvalidArgument naming every bad field otherwise."""
    violations = Violations()
    blocked_values = _check_values(draft.blocked_values, f"{path}.blocked_values", violations, _canonical_junk)
    _check_patterns(draft.blocked_patterns, f"{path}.blocked_patterns", violations)
    rules_path = f"{path}.shared_identifier_rules"
    violations.check(len(draft.shared_identifier_rules) <= MAX_SHARED_RULES, rules_path,
                     f"at most {MAX_SHARED_RULES} rules")
    known = ", ".join(t.type for t in registry.all())
    limits: dict[tuple[str, str], int] = {}
    for index, rule in enumerate(draft.shared_identifier_rules):
        where = f"{rules_path}[{index}]"
        for name, value in (("identifier_type", rule.identifier_type), ("distinct_type", rule.distinct_type)):
            violations.check(registry.get(value) is not None, f"{where}.{name}",
                             f"unknown identifier type {value!r}; known types: {known}")
        violations.check(1 <= rule.max_distinct <= MAX_DISTINCT, f"{where}.max_distinct", f"1-{MAX_DISTINCT}")
        pair = (rule.identifier_type, rule.distinct_type)
        violations.check(pair not in limits, where,
                         f"a second rule for {pair[0]} counting {pair[1]}; keep one rule per pair")
        limits[pair] = rule.max_distinct
    violations.raise_if_any("the guard policy is invalid", reason="INVALID_GUARD_POLICY")
    return GuardPolicy(blocked_values, tuple(dict.fromkeys(draft.blocked_patterns)), limits)


def _masked_fields(paths: Sequence[str], updatable: Sequence[str], immutable: Collection[str]) -> list[str]:
    """The fields an update mask names (`*` is every updatable one); InvalidArgument for any other path."""
    violations = Violations()
    violations.check(bool(paths), "update_mask",
                     f"required: the fields to change, from {', '.join(updatable)}, or * for all of them")
    fields: dict[str, None] = {}
    for index, path in enumerate(paths):
        where = f"update_mask.paths[{index}]"
        if path == "*":
            fields.update(dict.fromkeys(updatable))
        elif path in updatable:
            fields[path] = None
        elif path in immutable:
            violations.add(where, f"{path} cannot change after creation; create a new type instead")
        elif path in OUTPUT_ONLY_FIELDS:
            violations.add(where, f"{path} is set by the service and cannot be updated")
        else:
            violations.add(where, f"unknown field {path!r}; updatable: {', '.join(updatable)}")
    violations.raise_if_any("the update mask is invalid", reason="INVALID_UPDATE_MASK")
    return list(fields)


def _stale(resource: str, sent: str, current: str) -> Aborted:
    return Aborted(f"etag {sent} is stale: {resource} changed since it was read (its etag is now {current}); "
                   "read it again and reapply the change", reason="ETAG_MISMATCH",
                   metadata={"current_etag": current})


def type_name_of(name: str, field_path: str) -> str:
    """The type in a resource name `identifierTypes/{type}`; InvalidArgument naming `field_path` otherwise."""
    type_name = name.removeprefix(TYPE_NAME_PREFIX)
    if not name.startswith(TYPE_NAME_PREFIX) or not TYPE_NAME.fullmatch(type_name):
        raise InvalidArgument.for_field(field_path, f"{name!r} is not a resource name identifierTypes/{{type}} "
                                        "with a lower_snake_case type", reason="INVALID_IDENTIFIER_TYPE_NAME")
    return type_name


# ---- storage and propagation -----------------------------------------------------------------------

class IdentitySettings:
    """Reads, changes and follows the stored identifier types and guard policy of one keyspace, and
    installs them on `holder` (the IdentityGraph) whenever the stored ones are newer."""

    def __init__(self, session: CassandraSession, holder: SettingsHolder) -> None:
        self._session = session
        self._holder = holder
        self._install_lock = threading.Lock()
        self._installed = {TYPES_ROW: 0, POLICY_ROW: 0}
        self._stopped = threading.Event()
        self._follower: threading.Thread | None = None

    # ---- reading ----

    def refresh(self) -> None:
        """Read both rows and install whatever is newer than what is in force."""
        futures = {name: self._session.execute_async("SELECT document, etag FROM settings WHERE name = ?", (name,))
                   for name in (TYPES_ROW, POLICY_ROW)}
        self._install({name: _row_of(self._session.result(future).one()) for name, future in futures.items()})

    @property
    def registry(self) -> IdentifierRegistry:
        return self._holder.registry

    @property
    def policy(self) -> GuardPolicy:
        return self._holder.policy

    def identifier_type(self, type_name: str) -> IdentifierType:
        identifier_type = self._holder.registry.get(type_name)
        if identifier_type is None:
            raise NotFound(f"no identifier type {TYPE_NAME_PREFIX}{type_name}; ListIdentifierTypes lists them",
                           reason="IDENTIFIER_TYPE_NOT_FOUND")
        return identifier_type

    # ---- changing ----

    def create_type(self, draft: TypeDraft, *, validate_only: bool = False) -> IdentifierType:
        """Create a custom type; AlreadyExists when the name is taken (built-in names always are)."""
        created = validated_type(draft, path="identifier_type",
                                 default_phone_region=self._holder.registry.default_phone_region)

        def add(stored_types: dict[str, Any]) -> IdentifierType:
            if created.type in BUILT_IN_TYPES:
                raise AlreadyExists(f"{created.type} is a built-in identifier type; UpdateIdentifierType changes "
                                    "its priority, limits and blocked values", reason="IDENTIFIER_TYPE_BUILT_IN")
            if created.type in stored_types:
                raise AlreadyExists(f"identifier type {TYPE_NAME_PREFIX}{created.type} already exists",
                                    reason="IDENTIFIER_TYPE_EXISTS")
            stored_types[created.type] = _type_document(created)
            return created

        if validate_only:
            stored = _row_of(self._session.execute("SELECT document, etag FROM settings WHERE name = ?",
                                                   (TYPES_ROW,)).one())
            return add(dict(stored.body.get("types", {})) if stored else {})
        return self._change(TYPES_ROW, lambda body: _in_types(body, add))

    def update_type(self, name: str, draft: TypeDraft, mask: Sequence[str], etag: str) -> IdentifierType:
        """Change the masked fields of a type (built-in or custom); Aborted when `etag` is stale."""
        type_name = type_name_of(name, "identifier_type.name")
        fields = _masked_fields(mask, UPDATABLE_TYPE_FIELDS, IMMUTABLE_TYPE_FIELDS)
        _check_etag_form(etag, "identifier_type.etag")

        def update(stored_types: dict[str, Any]) -> IdentifierType:
            if type_name in stored_types:
                current = _type_from_document(type_name, stored_types[type_name])
            elif type_name in BUILT_IN_TYPES:
                current = BUILT_IN_TYPES[type_name]
            else:
                raise NotFound(f"no identifier type {TYPE_NAME_PREFIX}{type_name}; CreateIdentifierType creates it",
                               reason="IDENTIFIER_TYPE_NOT_FOUND")
            current_etag = type_etag(current)
            if etag and not etag_matches(etag, current_etag):
                raise _stale(f"{TYPE_NAME_PREFIX}{type_name}", etag, current_etag)
            base = TypeDraft(type_name, current.normalization, current.display_name, current.priority,
                             current.max_per_person, tuple(sorted(current.blocked_values)), current.blocked_patterns,
                             current.hash_values)
            updated = validated_type(replace(base, **{f: getattr(draft, f) for f in fields}), path="identifier_type",
                                     default_phone_region=self._holder.registry.default_phone_region,
                                     display_name_given="display_name" in fields)
            stored_types[type_name] = _type_document(updated)
            return updated

        return self._change(TYPES_ROW, lambda body: _in_types(body, update))

    def update_policy(self, draft: PolicyDraft, mask: Sequence[str], etag: str) -> GuardPolicy:
        """Change the masked fields of the guard policy; Aborted when `etag` is stale."""
        fields = _masked_fields(mask, UPDATABLE_POLICY_FIELDS, ())
        _check_etag_form(etag, "guard_policy.etag")
        self.refresh()  # rules name types: know every type stored so far, from any process

        def update(body: Mapping[str, Any] | None) -> tuple[dict[str, Any], GuardPolicy]:
            current = _policy_from_document(body) if body else GuardPolicy()
            current_etag = policy_etag(current)
            if etag and not etag_matches(etag, current_etag):
                raise _stale(POLICY_NAME, etag, current_etag)
            base = PolicyDraft(tuple(sorted(current.blocked_values)), current.blocked_patterns, tuple(
                SharedRule(shared, counted, limit) for (shared, counted), limit
                in current.shared_identifier_limits.items()))
            updated = validated_policy(replace(base, **{f: getattr(draft, f) for f in fields}),
                                       self._holder.registry, path="guard_policy")
            return _policy_document(updated), updated

        return self._change(POLICY_ROW, update)

    def _change(self, row_name: str,
                change: Callable[[Mapping[str, Any] | None], tuple[dict[str, Any], Result]]) -> Result:
        """Read-modify-write of one row, compare-and-set on its version; retried when another writer won."""
        for attempt in range(MAX_WRITE_ATTEMPTS):
            current = self._read_serial(row_name)
            body, result = change(current.body if current else None)
            proposed = _Row((current.generation if current else 0) + 1, uuid.uuid4().hex, body)
            if self._compare_and_set(row_name, current, proposed):
                self._install({row_name: proposed})
                return result
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))  # jittered, capped backoff
        raise Aborted(f"the {row_name.replace('_', ' ')} kept changing under concurrent updates; retry",
                      reason="CONCURRENT_SETTINGS_UPDATE")

    def _read_serial(self, row_name: str) -> _Row | None:
        # SERIAL: the latest accepted write, even one whose lightweight transaction is still finishing.
        return _row_of(self._session.execute("SELECT document, etag FROM settings WHERE name = ?", (row_name,),
                                             consistency=SERIAL_CONSISTENCY).one())

    def _compare_and_set(self, row_name: str, current: _Row | None, proposed: _Row) -> bool:
        document = json.dumps({**proposed.body, "generation": proposed.generation}, sort_keys=True)
        try:
            if current is None:
                result = self._session.execute(
                    "INSERT INTO settings (name, document, etag) VALUES (?, ?, ?) IF NOT EXISTS",
                    (row_name, document, proposed.version))
            else:
                result = self._session.execute(
                    "UPDATE settings SET document = ?, etag = ? WHERE name = ? IF etag = ?",
                    (document, proposed.version, row_name, current.version))
            return bool(result.was_applied)
        except Unavailable:
            # A compare-and-set that timed out may still have been applied: a serial read settles which.
            stored = self._read_serial(row_name)
            return stored is not None and stored.version == proposed.version

    def _install(self, rows: Mapping[str, _Row | None]) -> None:
        with self._install_lock:
            types_row = rows.get(TYPES_ROW)
            if types_row is not None and types_row.generation > self._installed[TYPES_ROW]:
                self._holder.registry = registry_from(types_row.body.get("types", {}),
                                                      self._holder.registry.default_phone_region)
                self._installed[TYPES_ROW] = types_row.generation
            policy_row = rows.get(POLICY_ROW)
            if policy_row is not None and policy_row.generation > self._installed[POLICY_ROW]:
                self._holder.policy = _policy_from_document(policy_row.body)
                self._installed[POLICY_ROW] = policy_row.generation

    # ---- following other processes' changes ----

    def follow(self, interval: float = RELOAD_INTERVAL_SECONDS) -> None:
        """Re-read the stored settings every `interval` seconds in a background thread, until `stop`."""
        self._follower = threading.Thread(target=self._follow, args=(interval,), name="identity-settings",
                                          daemon=True)
        self._follower.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._follower is not None:
            self._follower.join(timeout=10)

    def _follow(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            try:
                self.refresh()
            except Exception as error:  # a storage blip: keep the settings in force, try again next round
                log.warning("could not reload identity settings; keeping the ones in force",
                            extra={"error": f"{type(error).__name__}: {error}"})


def _in_types(body: Mapping[str, Any] | None,
              change: Callable[[dict[str, Any]], Result]) -> tuple[dict[str, Any], Result]:
    stored_types = dict(body.get("types", {})) if body else {}
    result = change(stored_types)
    return {"types": stored_types}, result


def _row_of(row: Any) -> _Row | None:
    if row is None or row.document is None:
        return None
    body = json.loads(row.document)
    generation = int(body.pop("generation", 0))
    return _Row(generation, row.etag or "", body)

