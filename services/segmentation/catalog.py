"""Segments as resources: create, get, list, update, delete, with validation against the other segments.

Domain code: raises shared.errors, never grpc. Rules are stored as their canonical text and parsed
on read, so what cqlsh shows is what a reviewer reads.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import IntEnum
from typing import TypeVar

from services.segmentation.rules import (
    MAX_RULE_CONDITIONS,
    MAX_RULE_TEXT_LENGTH,
    SEGMENT_ID,
    ModelExists,
    Rule,
    RuleProblem,
    conditions,
    referenced_segments,
    validate,
)
from services.segmentation.store import CatalogChanged, SegmentRecord, SegmentStore
from services.segmentation.text import RuleSyntaxError, format_rule, parse
from shared.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
    check_description,
    check_display_name,
)
from shared.etags import etag_matches, strong_etag
from shared.page_tokens import decode_page_token, encode_page_token

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
UPDATABLE_FIELDS = frozenset({"display_name", "description", "rule", "rule_text"})
# Checks of one rule change, each against the catalog as another rule change left it, before ABORTED.
CATALOG_CHANGE_TRIES = 5
_Result = TypeVar("_Result")

log = logging.getLogger(__name__)


class SegmentState(IntEnum):
    # Values match onecdp.segmentation.v1.SegmentState.
    COMPUTING = 1
    READY = 2
    FAILED = 3


@dataclass(frozen=True)
class Segment:
    segment_id: str
    display_name: str
    description: str
    rule: Rule | None  # None: the stored text cannot be read by this version (`_parsed`); state is then FAILED
    rule_text: str
    revision: int
    state: SegmentState
    member_count: int
    last_recompute_time: datetime | None
    create_time: datetime
    update_time: datetime
    etag: str
    operation_id: str = ""  # the latest recompute operation of the current revision ("" for none)

    @property
    def name(self) -> str:
        return f"segments/{self.segment_id}"


@dataclass(frozen=True)
class RuleInput:
    """The rule of a request and the request field it came from (`segment.rule` or `segment.rule_text`)."""

    rule: Rule
    field_path: str
    from_text: bool


def segment_id_of(name: str, field_path: str) -> str:
    """The id of a `segments/{segment_id}` name; INVALID_ARGUMENT naming `field_path` otherwise."""
    prefix, _, segment_id = name.partition("/")
    if prefix != "segments" or not SEGMENT_ID.match(segment_id):
        raise InvalidArgument.for_field(field_path, f"{name!r} is not a segment name like segments/loyal-buyers",
                                        reason="INVALID_SEGMENT_NAME")
    return segment_id


def rule_text_length_problem(rule_text: str) -> str | None:
    """Why a rule text given in a request is too long to parse, if it is (rules.MAX_RULE_TEXT_LENGTH)."""
    if len(rule_text) <= MAX_RULE_TEXT_LENGTH:
        return None
    return (f"a rule text is at most {MAX_RULE_TEXT_LENGTH} characters, this one has {len(rule_text)}: shorten "
            "its lists of values, or split the rule into segments and refer to them with segment(\"...\")")


def rule_size_problem(rule: Rule) -> str | None:
    """Why a rule is too big, if it is: more than rules.MAX_RULE_CONDITIONS conditions, or a canonical text
    longer than rules.MAX_RULE_TEXT_LENGTH characters."""
    count = sum(1 for _ in conditions(rule))
    if count > MAX_RULE_CONDITIONS:
        return (f"a rule has at most {MAX_RULE_CONDITIONS} conditions, this one has {count}: combine values with "
                "IN, or split the rule into segments and refer to them with segment(\"...\")")
    length = len(format_rule(rule))
    if length > MAX_RULE_TEXT_LENGTH:
        return (f"a rule's text is at most {MAX_RULE_TEXT_LENGTH} characters, this one's canonical text has "
                f"{length}: shorten its lists of values, or split the rule into segments")
    return None


def rule_problems_to_violations(problems: Sequence[RuleProblem], rule_input: RuleInput, violations: Violations) -> None:
    for problem in problems:
        if rule_input.from_text:
            where = f"at character {problem.position + 1}: " if problem.position >= 0 else ""
            violations.add(rule_input.field_path, f"{where}{problem.description} (rule.{problem.path})")
        else:
            violations.add(f"{rule_input.field_path}.{problem.path}", problem.description)


def _reason(violations: Violations, otherwise: str) -> str:
    """The reason of a create's or update's INVALID_ARGUMENT: INVALID_RULE when only the rule is at fault (what a
    syntax error of it gets too, and every call that takes a rule answers), else `otherwise`, naming the request."""
    rule_only = all(v.field == "segment.rule" or v.field.startswith(("segment.rule.", "segment.rule_text"))
                    for v in violations.items)
    return "INVALID_RULE" if rule_only else otherwise


def page_size_of(requested: int, default: int, maximum: int, field_path: str = "page_size") -> int:
    if requested < 0:
        raise InvalidArgument.for_field(field_path, f"must not be negative, got {requested}")
    return min(requested or default, maximum)


@functools.lru_cache(maxsize=4096)
def _parsed(rule_text: str) -> Rule | None:
    """A stored rule, or None when this version cannot read it: stored by an older version under rules it
    no longer accepts (a keyword as a property name, nesting deeper than 32 levels). Until its rule is
    updated such a segment is shown FAILED, real time skips it (its stored members stay as they were), a
    `segment(...)` reference to it matches nobody, and its recompute fails FAILED_PRECONDITION; the other
    segments are not affected. Logged once per text and process (the result is cached: real time
    reads every rule for each page of changes, and a rule's text rarely changes)."""
    try:
        return parse(rule_text)
    except (RuleSyntaxError, ValueError, RecursionError) as error:
        log.error("a stored segment rule cannot be read by this version: real time skips the segment, and "
                  "references to it match nobody, until its rule is updated",
                  extra={"rule_text": rule_text[:500], "error": str(error)})
        return None


def unreadable_rule(segment_id: str) -> FailedPrecondition:
    """The error of an operation that needs a segment's rule when its stored text cannot be read."""
    return FailedPrecondition(
        f"the stored rule of segments/{segment_id} cannot be read by this version (it was stored under older "
        "rules: a keyword as a property name, or nesting deeper than 32 levels); update the segment's rule "
        "(UpdateSegment with update_mask rule_text), then it is recomputed", reason="SEGMENT_RULE_UNREADABLE",
        metadata={"segment": f"segments/{segment_id}"})


def _serialised(change: Callable[[], _Result]) -> _Result:
    """Run a rule change (check against the references of one catalog version, then save if the version has
    not moved: store.CatalogChanged otherwise), checking it again while other rule changes get in between."""
    for _ in range(CATALOG_CHANGE_TRIES):
        try:
            return change()
        except CatalogChanged:
            continue
    raise Aborted(f"other segments kept changing while this change was checked ({CATALOG_CHANGE_TRIES} times); "
                  "retry", reason="CONCURRENT_UPDATE")


def _etag(record: SegmentRecord) -> str:
    # Stored bare, as the compare-and-set value of the row; shown quoted (strong_etag) in every response.
    text = "|".join((record.segment_id, str(record.revision), record.display_name, record.description,
                     record.rule_text, record.update_time.isoformat()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SegmentCatalog:
    """The segments. `on_rule_changed(segment_id)` runs after a create or a rule change (recompute);
    `model_exists` tells validation whether a score condition's model exists (None: unknown)."""

    def __init__(self, store: SegmentStore, on_rule_changed: Callable[[str], None] | None = None,
                 model_exists: ModelExists = lambda _: None) -> None:
        self.store = store
        self.on_rule_changed = on_rule_changed
        self.model_exists = model_exists

    def _references(self) -> dict[str, frozenset[str]]:
        return {record.segment_id: record.referenced for record in self.store.all()}

    def check_rule(self, rule_input: RuleInput, segment_id: str | None, violations: Violations,
                   references: Mapping[str, frozenset[str]] | None = None) -> None:
        too_big = rule_size_problem(rule_input.rule)
        if too_big is not None:  # nothing else is checked: its problems could be as many as its conditions
            violations.add(rule_input.field_path, too_big)
            return
        references = references if references is not None else self._references()
        problems = validate(rule_input.rule, segment_id=segment_id, references_of=references.get,
                            model_exists=functools.cache(self.model_exists))  # one question per model
        rule_problems_to_violations(problems, rule_input, violations)

    def create(self, segment_id: str, display_name: str, description: str, rule_input: RuleInput | None,
               rule_problems: Sequence[FieldViolation] = ()) -> Segment:
        """Create a segment. `rule_problems`: why the rule given could not be read (rule_input is then None), to be
        answered with every other problem of the request."""
        record = _serialised(lambda: self._create(segment_id, display_name, description, rule_input, rule_problems))
        self.store.add_revision(segment_id, 1, record.rule_text, record.create_time)
        if self.on_rule_changed is not None:
            self.on_rule_changed(segment_id)
            return self.get(segment_id)  # with the operation computing it
        return self._segment(record)

    def _create(self, segment_id: str, display_name: str, description: str,
                rule_input: RuleInput | None, rule_problems: Sequence[FieldViolation]) -> SegmentRecord:
        references, version = self.store.references()
        violations = Violations()
        violations.check(bool(SEGMENT_ID.match(segment_id)), "segment_id",
                         "1-63 lower-case letters, digits and hyphens, starting with a letter")
        check_display_name(violations, display_name, "segment.display_name")
        check_description(violations, description, "segment.description")
        violations.items.extend(rule_problems)
        if rule_input is not None:
            self.check_rule(rule_input, segment_id if SEGMENT_ID.match(segment_id) else None, violations, references)
        elif not rule_problems:
            violations.add("segment.rule", "give the rule as `rule` or `rule_text`")
        violations.raise_if_any("the segment is invalid", reason=_reason(violations, "INVALID_SEGMENT"))
        assert rule_input is not None
        now = datetime.now(UTC)
        rule_text = format_rule(rule_input.rule)
        record = SegmentRecord(segment_id, display_name, description, rule_text,
                               referenced_segments(rule_input.rule), 1, SegmentState.COMPUTING, None, now, now, "")
        record = replace(record, etag=_etag(record))
        if not self.store.insert(record, version):
            raise AlreadyExists(f"segments/{segment_id} already exists", reason="SEGMENT_EXISTS",
                                metadata={"segment": f"segments/{segment_id}"})
        return record

    def record(self, segment_id: str) -> SegmentRecord:
        record = self.store.get(segment_id)
        if record is None:
            raise NotFound(f"segments/{segment_id} does not exist", reason="SEGMENT_NOT_FOUND",
                           metadata={"segment": f"segments/{segment_id}"})
        return record

    def get(self, segment_id: str) -> Segment:
        return self._segment(self.record(segment_id))

    def list(self, page_size: int, page_token: str) -> tuple[list[Segment], str]:
        size = page_size_of(page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = (decode_page_token(page_token, "segments") or ("",))[0]
        records = self.store.page(after, size + 1)
        following = self.page_token_after(records[size - 1].segment_id) if len(records) > size else ""
        counts = self.store.member_counts([r.segment_id for r in records[:size]])
        return [self._segment(r, counts[r.segment_id]) for r in records[:size]], following

    def page_token_after(self, segment_id: str) -> str:
        """The token of the page of segments after `segment_id` (a page `list` gave, cut short by the caller)."""
        return encode_page_token("segments", (segment_id,))

    def update(self, segment_id: str, paths: Sequence[str], *, display_name: str, description: str,
               rule_input: RuleInput | None, etag: str, rule_problems: Sequence[FieldViolation] = ()) -> Segment:
        """Update the fields `paths` names; `rule_problems` as for `create`."""
        updated, rule_changed = _serialised(lambda: self._update(
            segment_id, paths, display_name=display_name, description=description, rule_input=rule_input,
            etag=etag, rule_problems=rule_problems))
        if rule_changed:
            self.store.add_revision(segment_id, updated.revision, updated.rule_text, updated.update_time)
        if rule_changed and self.on_rule_changed is not None:
            self.on_rule_changed(segment_id)
            # Segments referring to this one evaluate its rule inline (`segment("x")` is x's rule, not x's
            # stored members), so each recompute stands alone and their order does not matter; each is
            # started as its own operation, shown on its segment.
            for dependent in self.dependents_of(segment_id):
                try:
                    self.on_rule_changed(dependent)
                except NotFound:  # deleted meanwhile: nothing to recompute
                    continue
            return self.get(segment_id)  # with the operation computing it
        return self._segment(updated)

    def _update(self, segment_id: str, paths: Sequence[str], *, display_name: str, description: str,
                rule_input: RuleInput | None, etag: str,
                rule_problems: Sequence[FieldViolation]) -> tuple[SegmentRecord, bool]:
        violations = Violations()
        updatable = ", ".join(sorted(UPDATABLE_FIELDS))
        violations.check(bool(paths), "update_mask", f"name the fields to update: {updatable}")
        for index, path in enumerate(paths):
            violations.check(path in UPDATABLE_FIELDS, f"update_mask.paths[{index}]",
                             f"{path!r} cannot be updated; updatable: {updatable}")
        if "display_name" in paths:
            check_display_name(violations, display_name, "segment.display_name")
        if "description" in paths:
            check_description(violations, description, "segment.description")
        wants_rule = bool({"rule", "rule_text"} & set(paths))
        version = None
        violations.items.extend(rule_problems)
        if wants_rule and rule_input is None and not rule_problems:
            violations.add("segment.rule", "the mask names the rule: give `rule` or `rule_text`")
        if wants_rule and rule_input is not None:
            references, version = self.store.references()
            self.check_rule(rule_input, segment_id, violations, references)
        violations.raise_if_any("the update is invalid", reason=_reason(violations, "INVALID_UPDATE"))
        current = self.record(segment_id)
        if etag and not etag_matches(etag, current.etag):
            raise Aborted(f"segments/{segment_id} changed since etag {etag!r} was read; get it again and retry",
                          reason="ETAG_MISMATCH")
        now = datetime.now(UTC)
        updated = current
        if "display_name" in paths:
            updated = replace(updated, display_name=display_name)
        if "description" in paths:
            updated = replace(updated, description=description)
        rule_changed = False
        if wants_rule and rule_input is not None:
            rule_text = format_rule(rule_input.rule)
            if rule_text != current.rule_text:
                rule_changed = True
                updated = replace(updated, rule_text=rule_text, referenced=referenced_segments(rule_input.rule),
                                  revision=current.revision + 1, state=SegmentState.COMPUTING)
        updated = replace(updated, update_time=now)
        updated = replace(updated, etag=_etag(updated))
        # Only a rule change is serialised with the others (its references are what the check read).
        if not self.store.replace(updated, current.etag, version if rule_changed else None):
            raise Aborted(f"segments/{segment_id} was changed concurrently; get it again and retry",
                          reason="CONCURRENT_UPDATE")
        return updated, rule_changed

    def dependents_of(self, segment_id: str) -> tuple[str, ...]:
        """The segments that refer to `segment_id`, directly or through others, each once, sorted."""
        references = self._references()
        found: set[str] = set()
        pending = [segment_id]
        while pending:
            current = pending.pop()
            for user, referenced in references.items():
                if current in referenced and user not in found and user != segment_id:
                    found.add(user)
                    pending.append(user)
        return tuple(sorted(found))

    def delete(self, segment_id: str, etag: str) -> None:
        _serialised(lambda: self._delete(segment_id, etag))
        self.store.delete_history(segment_id)

    def _delete(self, segment_id: str, etag: str) -> None:
        references, version = self.store.references()
        current = self.record(segment_id)
        if etag and not etag_matches(etag, current.etag):
            raise Aborted(f"segments/{segment_id} changed since etag {etag!r} was read", reason="ETAG_MISMATCH")
        users = sorted(s for s, refs in references.items() if segment_id in refs and s != segment_id)
        if users:
            raise FailedPrecondition(
                f"segments/{segment_id} is used by {', '.join(f'segments/{s}' for s in users)}; change or delete "
                "those first", reason="SEGMENT_IN_USE", metadata={"used_by": ",".join(f"segments/{s}" for s in users)})
        if not self.store.delete(segment_id, current.etag, version):
            raise Aborted(f"segments/{segment_id} was changed concurrently; get it again and retry",
                          reason="CONCURRENT_UPDATE")

    def rules(self) -> dict[str, Rule]:
        """Every segment's current rule, for evaluating `segment(...)` references; a segment whose stored rule
        cannot be read is left out (it, and a reference to it, match nobody)."""
        parsed = {record.segment_id: _parsed(record.rule_text) for record in self.store.all()}
        return {segment_id: rule for segment_id, rule in parsed.items() if rule is not None}

    def rules_for(self, segment_ids: Sequence[str]) -> dict[str, Rule]:
        """`rules()`, holding each of `segment_ids`: NOT_FOUND naming the first that does not exist, or
        FAILED_PRECONDITION when its stored rule cannot be read (checked in order, one segment at a time).

        `rules()` and `record()` are two reads: a segment created between them is found by the second but is
        not in the first. Its rule is fine, so the catalog is read again (once): the new segment is in it,
        and so are the segments its rule refers to, which may be as new. One deleted meanwhile keeps the rule
        its record had."""
        rules = self.rules()
        created: dict[str, Rule] = {}
        for segment_id in segment_ids:
            if segment_id not in rules and segment_id not in created:
                created[segment_id] = self.readable_rule(self.record(segment_id))
        if created:
            rules = {**created, **self.rules()}
        return rules

    @staticmethod
    def readable_rule(record: SegmentRecord) -> Rule:
        """A stored segment's rule; FAILED_PRECONDITION when this version cannot read it."""
        rule = _parsed(record.rule_text)
        if rule is None:
            raise unreadable_rule(record.segment_id)
        return rule

    def _segment(self, record: SegmentRecord, member_count: int | None = None) -> Segment:
        rule = _parsed(record.rule_text)
        return Segment(record.segment_id, record.display_name, record.description, rule,
                       record.rule_text, record.revision,
                       SegmentState(record.state) if rule is not None else SegmentState.FAILED,
                       self.store.member_count(record.segment_id) if member_count is None else member_count,
                       record.last_recompute_time, record.create_time,
                       record.update_time, strong_etag(record.etag),
                       record.operation_id if record.operation_revision == record.revision else "")
