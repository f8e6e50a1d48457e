"""The ProfileSource over the profile service's gRPC API (an adapter: it imports grpc, the domain does not).

What it reads from profile (onecdp.profile.v1):
- ListProfileShards(shard_count) -> shards; then per shard ScanProfiles(shard, include_events=true,
  events_end_time=before, read_mask=person_id) streaming ScannedProfile{profile.person_id, events
  oldest first}: every person's history for training and score refresh.
- BatchGetProfiles(persons (up to 1,000), include_events=true, events_end_time=before,
  read_mask=person_id): the histories of the persons being scored, one call per 1,000 (up to
  MAX_READS_IN_FLIGHT calls at once). One call covers identity lookups and reads of every person, so
  scoring one person is one round trip to profile. A selector profile refuses (INVALID_ARGUMENT naming
  `persons[i]`) becomes that person's `RefusedSelector` and the others are read again without it; a bad
  selector is the request's error, not the person's, so the gRPC adapter fails the call naming each one
  (`refused_selector_violations`). `selector_violations` catches the malformed ones before any read.
- ListProfileEvents(person_id, end_time=before), paged: the events of a person a scan or batch read sent with
  `events_omitted` (more than one message carries), so a heavy person's history is whole, not empty.
- ListProfileChanges(page_token=cursor, with the unsettled tail): the changes the online store follows
  (online.py). The feed's
  cursors are time UUIDs (shared.changefeed), so the follower starts at a cursor made for its start time
  instead of paging through the whole retained feed.
- BatchWriteTraits: refreshed scores written back as traits `score_<model_id>` and
  `score_<model_id>_percentile`, source `onecdp-prediction`, event time = when they were computed;
  null values (deletes) for those of a refresh's ineligible persons who hold a score
  (BatchGetProfiles of those two traits) and, on DeleteModel, for every holder (ScanProfiles of them).

Event mapping (StoredEvent.event -> ActivityEvent): ORDER -> name `order`, amount = order.amount,
category = the first item's category; TRACK/PAGE/SCREEN -> event_name, amount = properties.revenue
when numeric, category = properties.category when a string. IDENTIFY and ALIAS are state, not
behaviour, and are skipped. Every ORDER event is kept as its own money movement with its signed amount
(a refund is a later event with a negative amount under the same order id; it replaces nothing): the
features tell purchases (amount >= 0) from refunds (see features.py), and an event
after a cutoff cannot alter what the history looked like before it.
"""

from __future__ import annotations

import re
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onecdp.common.v1 import common_pb2
from onecdp.profile.v1 import profile_service_pb2 as profile_pb
from onecdp.profile.v1 import profile_service_pb2_grpc as profile_grpc

from services.prediction.history import (
    ORDER_EVENT,
    ActivityEvent,
    PendingHistories,
    PersonHistory,
    PersonRef,
    ReadsByStarting,
    RefsByPersonId,
    person_not_found,
)
from services.prediction.jobs import SCORES_SOURCE, score_trait_names
from services.prediction.online import ChangeKind, HistoryChange
from services.prediction.scoring import PersonScore
from shared import deadline
from shared.changefeed import cursor_at
from shared.clients import every_profile_event
from shared.errors import DeadlineExceeded, DomainError, FieldViolation, InvalidArgument, NotFound, Unavailable

DEFAULT_SHARDS = 16
SCAN_BATCH_SIZE = 500
# Profile's BatchGetProfiles limit.
MAX_PERSONS_PER_READ = 1000
# Profile's ListProfileEvents page size limit (a page also stops at 3 MiB).
MAX_EVENTS_PER_PAGE = 1000
# BatchGetProfiles calls of one batch at once: each keeps one of profile's worker threads busy.
MAX_READS_IN_FLIGHT = 4
# A batch with bad selectors is read again without them; identity names one per call.
MAX_INVALID_ROUNDS = 8
READ_TIMEOUT_SECONDS = 30.0
# A feed poll is small; a short deadline also bounds how long stopping the follower can wait for one.
FEED_TIMEOUT_SECONDS = 5.0
WRITE_TIMEOUT_SECONDS = 30.0
# Profile's BatchWriteTraits limit.
MAX_TRAIT_WRITES = 1000
_SKIPPED_TYPES = frozenset({profile_pb.EVENT_TYPE_IDENTIFY, profile_pb.EVENT_TYPE_ALIAS,
                            profile_pb.EVENT_TYPE_UNSPECIFIED})
_PERSON_ID_ONLY = field_mask_pb2.FieldMask(paths=["person_id"])
_PERSON_INDEX = re.compile(r"persons\[([0-9]+)\]")
# Identity's forms of a person id and of an identifier type (services/identity: graph.PERSON_ID_PATTERN,
# identifiers.TYPE_NAME). A selector outside them can match nobody, and identity refuses it; checked here
# first, so a batch names all of them at once instead of one per profile round trip. Whole strings only:
# fullmatch (`$` would also match before a final newline).
PERSON_ID_FORM = "'p_' followed by 1-62 lowercase letters and digits"
_PERSON_ID = re.compile(r"p_[0-9a-z]{1,62}")
_PERSON_IDS = re.compile(r"(?:p_[0-9a-z]{1,62}\n)*")  # ids joined by newlines, each ending in one
IDENTIFIER_TYPE_FORM = "lower_snake_case: a lowercase letter, then up to 62 lowercase letters, digits and '_'"
_IDENTIFIER_TYPE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_CHANGE_KINDS = {profile_pb.PROFILE_CHANGE_TYPE_EVENTS: ChangeKind.EVENTS,
                 profile_pb.PROFILE_CHANGE_TYPE_TRAITS: ChangeKind.TRAITS,
                 profile_pb.PROFILE_CHANGE_TYPE_MERGE: ChangeKind.MERGE,
                 profile_pb.PROFILE_CHANGE_TYPE_SPLIT: ChangeKind.SPLIT,
                 profile_pb.PROFILE_CHANGE_TYPE_ERASE: ChangeKind.ERASE}
# 100-ns intervals between the UUID epoch (1582-10-15) and the Unix epoch.


class RefusedSelector(InvalidArgument):
    """A selector profile refused (INVALID_ARGUMENT naming it, e.g. an identifier type identity's rules do not
    know): the request's error, not the person's. ScorePerson and GetPersonFeatures raise it as it is (it names
    `person`); a batch fails the call naming `persons[i]` (`refused_selector_violations`)."""

    def __init__(self, why: str, field_path: str = "person") -> None:
        description = f"profile refused the selector: {why}"
        super().__init__(f"{field_path}: {description}", reason="BAD_PERSON_SELECTOR",
                         field_violations=[FieldViolation(field_path, description)])
        self.why = why


def selector_problem(person: PersonRef) -> str | None:
    """Why a selector can match nobody whatever profile holds (not identity's form), or None."""
    if person.person_id is not None:
        if _PERSON_ID.fullmatch(person.person_id):
            return None
        return f"{person.person_id[:80]!r} is not a person id: expected {PERSON_ID_FORM}"
    kind = person.identifier_type or ""
    if _IDENTIFIER_TYPE.fullmatch(kind):
        return None
    return f"{kind[:80]!r} is not an identifier type: expected {IDENTIFIER_TYPE_FORM}"


def selector_violations(persons: Sequence[PersonRef], field_path: str = "persons") -> list[FieldViolation]:
    """`selector_problem` of every selector, as violations of `{field_path}[i]` (the gRPC adapter adds them to
    the request's others); a batch of well-formed person ids (the usual one) is checked in one pass."""
    if isinstance(persons, RefsByPersonId):
        joined = "\n".join(persons.person_ids) + "\n"
        if joined.count("\n") == len(persons) and _PERSON_IDS.fullmatch(joined):
            return []
    # An empty selector (person_id "") is the adapter's to refuse ("set exactly one of ..."), not named twice.
    return [FieldViolation(f"{field_path}[{index}]", problem) for index, person in enumerate(persons)
            if person.person_id != "" and (problem := selector_problem(person)) is not None]


def refused_selector_violations(errors: Mapping[int, DomainError],
                                field_path: str = "persons") -> list[FieldViolation]:
    """The selectors profile refused among a batch's per-person errors (request position -> error), as
    violations of `{field_path}[i]`: the adapter fails the call with them (BatchScorePersons' contract: a bad
    selector fails the call; a person's own error is only NOT_FOUND or FAILED_PRECONDITION)."""
    return [FieldViolation(f"{field_path}[{index}]", error.field_violations[0].description)
            for index, error in sorted(errors.items()) if isinstance(error, RefusedSelector)]


def raise_refused_selectors(errors: Mapping[int, DomainError], field_path: str = "persons") -> None:
    """InvalidArgument naming every selector of `errors` profile refused (`refused_selector_violations`), if any."""
    if violations := refused_selector_violations(errors, field_path):
        raise InvalidArgument(f"profile refused {len(violations)} selector(s): "
                              + "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
                              + (f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""),
                              reason="BAD_PERSON_SELECTOR", field_violations=violations)


def _selector(person: PersonRef) -> common_pb2.PersonSelector:
    if person.person_id is not None:
        return common_pb2.PersonSelector(person_id=person.person_id)
    return common_pb2.PersonSelector(identifier=common_pb2.Identifier(type=person.identifier_type or "",
                                                                       value=person.identifier_value or ""))


def activity_events(stored: Iterable[profile_pb.StoredEvent], before: datetime | None = None) -> list[ActivityEvent]:
    """Profile's stored events (any order) as a time-sorted history, only those strictly before `before`.

    Profile filters on the exact event time too; the boundary is applied again here (one comparison per
    event) so that point-in-time correctness does not rest on another service's filter alone.
    """
    ordered = sorted(stored, key=lambda s: (s.event.event_time.seconds, s.event.event_time.nanos,
                                            s.event.message_id))
    events = []
    for item in ordered:
        event = item.event
        if event.type in _SKIPPED_TYPES:
            continue
        time = event.event_time.ToDatetime(tzinfo=UTC)
        if before is not None and time >= before:
            continue
        if event.type == profile_pb.EVENT_TYPE_ORDER:
            order = event.order
            category = next((i.category for i in order.items if i.category), None)
            events.append(ActivityEvent(ORDER_EVENT, time, order.amount, category))
            continue
        properties = event.properties.fields
        revenue = properties.get("revenue")
        category_value = properties.get("category")
        events.append(ActivityEvent(
            event.event_name, time,
            revenue.number_value if revenue is not None and revenue.WhichOneof("kind") == "number_value" else None,
            category_value.string_value
            if category_value is not None and category_value.WhichOneof("kind") == "string_value" else None))
    return events


def _domain_error(error: grpc.RpcError, what: str) -> DomainError:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {details}", reason="PERSON_NOT_FOUND")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what}: the profile service did not answer in time; retry with a longer deadline",
                                reason="PROFILE_DEADLINE")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument.for_field("person", f"{what}: {details}", reason="BAD_PERSON_SELECTOR")
    return Unavailable(f"{what}: the profile service answered {code.name if code else 'an error'} ({details}); "
                       "retry with backoff", reason="PROFILE_UNAVAILABLE")


def profile_shards(stub: profile_grpc.ProfileServiceStub, shard_count: int = DEFAULT_SHARDS) -> list[str]:
    """Profile's shard tokens (ListProfileShards): together they cover every profile once."""
    try:
        response = stub.ListProfileShards(profile_pb.ListProfileShardsRequest(shard_count=shard_count),
                                          timeout=deadline.timeout_within(READ_TIMEOUT_SECONDS))
    except grpc.RpcError as error:
        raise _domain_error(error, "listing profile shards") from error
    return list(response.shards)


class GrpcProfileSource(ReadsByStarting):
    """Histories from the profile service."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub, shard_count: int = DEFAULT_SHARDS) -> None:
        self._stub = stub
        self._shard_count = shard_count

    def shards(self) -> list[str]:
        return profile_shards(self._stub, self._shard_count)

    def histories_of_shard(self, shard: str, before: datetime) -> Iterator[PersonHistory]:
        request = profile_pb.ScanProfilesRequest(shard=shard, read_mask=_PERSON_ID_ONLY, include_events=True,
                                                 batch_size=SCAN_BATCH_SIZE)
        request.events_end_time.FromDatetime(before)
        try:
            for batch in self._stub.ScanProfiles(request):
                for scanned in batch.profiles:
                    person_id = scanned.profile.person_id
                    stored = self.omitted_events(person_id, before) if scanned.events_omitted else scanned.events
                    yield PersonHistory(person_id, activity_events(stored, before))
        except grpc.RpcError as error:
            raise _domain_error(error, f"scanning profile shard {shard}") from error

    def omitted_events(self, person_id: str, before: datetime | None) -> list[profile_pb.StoredEvent]:
        """The events (before `before`) of a person profile sent with `events_omitted`: ListProfileEvents pages
        (any order does: activity_events sorts them); none for a person profile no longer knows (erased since
        it was read). Raises grpc.RpcError as the read it completes does."""
        request = profile_pb.ListProfileEventsRequest(person=common_pb2.PersonSelector(person_id=person_id),
                                                      page_size=MAX_EVENTS_PER_PAGE)
        if before is not None:
            request.end_time.FromDatetime(before)
        return every_profile_event(self._stub, request, lambda: deadline.timeout_within(READ_TIMEOUT_SECONDS))

    def histories(self, before: datetime) -> Iterator[PersonHistory]:
        for shard in self.shards():
            yield from self.histories_of_shard(shard, before)

    def start_histories_of(self, persons: Sequence[PersonRef], before: datetime | None) -> PendingHistories:
        return _PendingReads(self, persons, before)

    def start_read(self, persons: Sequence[PersonRef], before: datetime | None) -> grpc.Future:
        """One BatchGetProfiles call (at most MAX_PERSONS_PER_READ persons), not waited for."""
        request = profile_pb.BatchGetProfilesRequest(persons=[_selector(p) for p in persons], include_events=True,
                                                     read_mask=_PERSON_ID_ONLY)
        if before is not None:
            request.events_end_time.FromDatetime(before)
        future: grpc.Future = self._stub.BatchGetProfiles.future(
            request, timeout=deadline.timeout_within(READ_TIMEOUT_SECONDS))
        return future

    def finish_read(self, persons: Sequence[PersonRef], before: datetime | None,
                    started: grpc.Future) -> list[PersonHistory | DomainError]:
        """The histories of a started read, in order. Selectors profile refuses get their own error and the
        others are read again, at most MAX_INVALID_ROUNDS times (identity names one bad selector per call)."""
        results: list[PersonHistory | DomainError | None] = [None] * len(persons)
        pending = list(range(len(persons)))  # positions in `persons` that the current call reads
        future = started
        for _ in range(MAX_INVALID_ROUNDS):
            try:
                response: profile_pb.BatchGetProfilesResponse = future.result()
            except grpc.RpcError as error:
                refused = _refused_selectors(error)
                if not refused and _is_internal(error):
                    # Profile names an invalid identifier of a batch read (INVALID_ARGUMENT, persons[i]: above).
                    # An INTERNAL or UNKNOWN names nobody: a profile release from before it did, or one person
                    # whose read trips a bug. Halving the batch until that person is found fails only them.
                    return self._merge(results, pending, self._read_halves([persons[i] for i in pending], before,
                                                                           error))
                failure = _domain_error(error, "reading persons' events")
                if not refused:
                    return [failure if r is None else r for r in results]
                for position, message in refused.items():
                    results[pending[position]] = RefusedSelector(message)
                pending = [index for position, index in enumerate(pending) if position not in refused]
                if not pending:
                    break
                try:
                    future = self.start_read([persons[i] for i in pending], before)
                except DomainError as deadline_passed:
                    return [deadline_passed if r is None else r for r in results]
                continue
            for index, found in zip(pending, response.results, strict=True):
                results[index] = (self._history(found, before) if found.found
                                  else person_not_found(persons[index]))
            pending = []
            break
        too_many = InvalidArgument.for_field("person", "profile refused too many selectors of this batch",
                                             reason="BAD_PERSON_SELECTOR")
        return [too_many if r is None else r for r in results]


    def _history(self, found: profile_pb.ProfileLookupResult, before: datetime | None) -> PersonHistory | DomainError:
        """A found person's history; their events paged when profile left them out of the batch (`events_omitted`)."""
        if not found.events_omitted:
            return PersonHistory(found.profile.person_id, activity_events(found.events, before))
        try:
            stored = self.omitted_events(found.profile.person_id, before)
        except grpc.RpcError as error:
            return _domain_error(error, "reading the person's events")
        except DomainError as deadline_passed:
            return deadline_passed
        return PersonHistory(found.profile.person_id, activity_events(stored, before))

    @staticmethod
    def _merge(results: list[PersonHistory | DomainError | None], positions: Sequence[int],
               read: Sequence[PersonHistory | DomainError]) -> list[PersonHistory | DomainError]:
        for position, history in zip(positions, read, strict=True):
            results[position] = history
        return [r for r in results if r is not None]

    def _read_halves(self, persons: Sequence[PersonRef], before: datetime | None,
                     error: grpc.RpcError) -> list[PersonHistory | DomainError]:
        if len(persons) == 1:
            return [self._why_unreadable(persons[0], error)]
        middle = len(persons) // 2
        halves = [persons[:middle], persons[middle:]]
        try:
            started = [self.start_read(half, before) for half in halves]
        except DomainError as deadline_passed:
            return [deadline_passed] * len(persons)
        return [history for half, future in zip(halves, started, strict=True)
                for history in self.finish_read(half, before, future)]

    def _why_unreadable(self, person: PersonRef, error: grpc.RpcError) -> DomainError:
        """GetProfile refuses an invalid identifier with INVALID_ARGUMENT; anything else keeps the read's error."""
        try:
            self._stub.GetProfile(profile_pb.GetProfileRequest(person=_selector(person), read_mask=_PERSON_ID_ONLY),
                                  timeout=deadline.timeout_within(READ_TIMEOUT_SECONDS))
        except grpc.RpcError as probe_error:
            if isinstance(probe_error, grpc.Call) and probe_error.code() is grpc.StatusCode.INVALID_ARGUMENT:
                return RefusedSelector(probe_error.details() or "INVALID_ARGUMENT")
            if isinstance(probe_error, grpc.Call) and probe_error.code() is grpc.StatusCode.NOT_FOUND:
                return _domain_error(probe_error, "reading the person's events")
        except DomainError as deadline_passed:
            return deadline_passed
        return _domain_error(error, "reading the person's events")


    def cursor_at(self, time: datetime) -> str:
        """Profile's feed cursor before every change taken at or after `time` (shared.changefeed.cursor_at)."""
        return cursor_at(time)

    def changes(self, cursor: str, limit: int) -> tuple[list[HistoryChange], str]:
        """The next profile changes after `cursor`, and where to go on (ListProfileChanges)."""
        try:
            page = self._stub.ListProfileChanges(profile_pb.ListProfileChangesRequest(page_size=limit,
                                                                                     page_token=cursor),
                                                 timeout=FEED_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            raise _domain_error(error, "reading profile's changes") from error
        # A kind this release does not know may change anything: treat it as a merge (drop the persons).
        return [HistoryChange(uuid.UUID(c.cursor), c.person_id, _CHANGE_KINDS.get(c.type, ChangeKind.MERGE),
                              tuple(c.merged_person_ids))
                for c in page.changes], page.next_page_token


class _PendingReads:
    """A batch's BatchGetProfiles calls: MAX_READS_IN_FLIGHT are sent at once, the next when one returns."""

    def __init__(self, source: GrpcProfileSource, persons: Sequence[PersonRef], before: datetime | None) -> None:
        self._source = source
        self._persons = list(persons)
        self._before = before
        self._chunks = [range(start, min(start + MAX_PERSONS_PER_READ, len(self._persons)))
                        for start in range(0, len(self._persons), MAX_PERSONS_PER_READ)]
        self._in_flight: deque[tuple[range, grpc.Future | DomainError]] = deque()
        self._next = 0
        while self._next < len(self._chunks) and len(self._in_flight) < MAX_READS_IN_FLIGHT:
            self._start_next()

    def _start_next(self) -> None:
        chunk = self._chunks[self._next]
        self._next += 1
        try:
            started: grpc.Future | DomainError = self._source.start_read([self._persons[i] for i in chunk],
                                                                         self._before)
        except DomainError as deadline_passed:
            started = deadline_passed
        self._in_flight.append((chunk, started))

    def result(self) -> list[PersonHistory | DomainError]:
        results: list[PersonHistory | DomainError] = []
        while self._in_flight:
            chunk, started = self._in_flight.popleft()
            if self._next < len(self._chunks):
                self._start_next()
            if isinstance(started, DomainError):
                results += [started] * len(chunk)
            else:
                results += self._source.finish_read([self._persons[i] for i in chunk], self._before, started)
        return results


def _is_internal(error: grpc.RpcError) -> bool:
    return isinstance(error, grpc.Call) and error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def _refused_selectors(error: grpc.RpcError) -> dict[int, str]:
    """INVALID_ARGUMENT naming `persons[i]` in its field violations: i -> why (empty for any other error)."""
    if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return {}
    status = rpc_status.from_call(error)
    refused: dict[int, str] = {}
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                match = _PERSON_INDEX.match(violation.field)
                if match:
                    refused.setdefault(int(match.group(1)), violation.description)
    return refused


class GrpcScoreWriter:
    """Writes scores back to profile as traits with BatchWriteTraits (at most 1,000 writes per call), and
    deletes the score traits that must not stay: those of persons a refresh found ineligible, and all of a
    deleted model's. A delete is a write of null values dated when it is made, so a score written later (by
    event time: a refresh of a model created again with the same id) is never undone by it."""

    def __init__(self, stub: profile_grpc.ProfileServiceStub, shard_count: int = DEFAULT_SHARDS) -> None:
        self._stub = stub
        self._shard_count = shard_count

    def write_scores(self, model_id: str, scores: Sequence[PersonScore], written_at: datetime) -> None:
        score_trait, percentile_trait = score_trait_names(model_id)
        self._write([(score.person_id, {score_trait: score.probability, percentile_trait: score.percentile})
                     for score in scores], written_at, "writing scores back to profile")

    def clear_scores(self, model_id: str, person_ids: Sequence[str], cleared_at: datetime) -> int:
        """Delete the model's score traits of those of `person_ids` that hold one (a refresh's ineligible
        persons: their old score would otherwise stay in segments); returns how many persons held one.

        Persons are read first (BatchGetProfiles of the two traits) so that someone ineligible at every
        refresh gets no new delete each time."""
        names = score_trait_names(model_id)
        holders: list[str] = []
        for start in range(0, len(person_ids), MAX_PERSONS_PER_READ):
            selectors = [common_pb2.PersonSelector(person_id=p) for p in person_ids[start:start + MAX_PERSONS_PER_READ]]
            request = profile_pb.BatchGetProfilesRequest(persons=selectors, read_mask=_score_traits_mask(names))
            try:
                response = self._stub.BatchGetProfiles(request, timeout=deadline.timeout_within(READ_TIMEOUT_SECONDS))
            except grpc.RpcError as error:
                raise _domain_error(error, "reading which persons hold a score") from error
            holders += [result.profile.person_id for result in response.results
                        if result.found and _holds_any(result.profile, names)]
        self._delete(names, holders, cleared_at)
        return len(holders)

    def clear_all_scores(self, model_id: str, cleared_at: datetime) -> int:
        """Delete the model's score traits from every profile holding one (a deleted model's scores must not
        stay in segments); returns how many persons held one. Scans every profile (traits only, no events)."""
        names = score_trait_names(model_id)
        cleared = 0
        for shard in profile_shards(self._stub, self._shard_count):
            request = profile_pb.ScanProfilesRequest(shard=shard, read_mask=_score_traits_mask(names),
                                                     batch_size=MAX_TRAIT_WRITES)
            try:
                for batch in self._stub.ScanProfiles(request, timeout=deadline.timeout_within(READ_TIMEOUT_SECONDS)):
                    holders = [scanned.profile.person_id for scanned in batch.profiles
                               if _holds_any(scanned.profile, names)]
                    self._delete(names, holders, cleared_at)
                    cleared += len(holders)
            except grpc.RpcError as error:
                raise _domain_error(error, f"scanning profile shard {shard} for scores") from error
        return cleared

    def _delete(self, names: Sequence[str], person_ids: Sequence[str], cleared_at: datetime) -> None:
        deleted: dict[str, float | None] = dict.fromkeys(names)
        self._write([(person_id, deleted) for person_id in person_ids], cleared_at, "deleting scores from profile")

    def _write(self, traits_by_person: Sequence[tuple[str, dict[str, float | None]]], event_time: datetime,
               what: str) -> None:
        """BatchWriteTraits of each person's traits (a None value deletes the trait), 1,000 persons a call."""
        for start in range(0, len(traits_by_person), MAX_TRAIT_WRITES):
            request = profile_pb.BatchWriteTraitsRequest()
            for person_id, traits in traits_by_person[start:start + MAX_TRAIT_WRITES]:
                write = request.writes.add(person_id=person_id, source=SCORES_SOURCE, party=common_pb2.DATA_PARTY_FIRST)
                write.traits.update(traits)
                write.event_time.FromDatetime(event_time)
            try:
                self._stub.BatchWriteTraits(request, timeout=deadline.timeout_within(WRITE_TIMEOUT_SECONDS))
            except grpc.RpcError as error:
                raise _domain_error(error, what) from error


def _score_traits_mask(names: Sequence[str]) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=["person_id", *(f"traits.{name}" for name in names)])


def _holds_any(profile: profile_pb.Profile, names: Sequence[str]) -> bool:
    return any(name in profile.traits for name in names)
