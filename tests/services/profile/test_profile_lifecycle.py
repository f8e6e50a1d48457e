"""Profiles following identity: merge, split, erase; scans, trait writes and the change feed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from onecdp.common.v1 import common_pb2
from onecdp.identity.v1 import identity_service_pb2 as identity_pb
from onecdp.identity.v1 import identity_service_pb2_grpc as identity_grpc
from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from shared import cassandra
from tests.services.profile.conftest import at, eventually, ident, identify, ingest, order, profile_of, track

pytestmark = pytest.mark.integration

Stub = pb_grpc.ProfileServiceStub
IdentityStub = identity_grpc.IdentityServiceStub


def test_a_merge_gives_the_survivor_both_histories(profiles: Stub) -> None:
    cookie = ingest(profiles, track("cookie:anon-1", name="view_item", when="2026-01-01"),
                    identify("cookie:anon-1", when="2026-01-01", traits={"utm": "mail"}))[0].person_id
    account = ingest(profiles, order("account_id:acc-1", order_id="o1", amount=25.0, when="2026-01-03"),
                     identify("account_id:acc-1", when="2026-01-03", traits={"plan": "pro"}))[0].person_id
    assert cookie != account
    login = ingest(profiles, identify("cookie:anon-1", "account_id:acc-1", when="2026-01-04"))[0]
    survivor = login.person_id
    assert survivor in (cookie, account)
    merged = profile_of(profiles, "cookie:anon-1")
    assert merged.person_id == survivor == profile_of(profiles, "account_id:acc-1").person_id
    assert {cookie, account} - {survivor} <= set(merged.merged_person_ids)
    assert merged.computed.event_count == 5
    assert (merged.computed.frequency, merged.computed.monetary) == (1, 25.0)
    assert {"utm", "plan"} <= set(merged.traits)
    # The loser's id still reads the survivor's profile.
    loser = ({cookie, account} - {survivor}).pop()
    by_old_id = profiles.GetProfile(pb.GetProfileRequest(person=common_pb2.PersonSelector(person_id=loser)), timeout=10)
    assert by_old_id.person_id == survivor


def test_a_split_gives_each_person_their_own_events_back(profiles: Stub, identity: IdentityStub) -> None:
    ingest(profiles, track("cookie:s-a", name="a_only", when="2026-02-01"),
           track("email:s-b@example.com", name="b_only", when="2026-02-02"))
    link = ingest(profiles, identify("cookie:s-a", "email:s-b@example.com", when="2026-02-03", traits={"both": 1},
                                     message_id="the-bad-link"))[0]
    assert profile_of(profiles, "cookie:s-a").person_id == profile_of(profiles, "email:s-b@example.com").person_id
    identity.UnlinkIdentifiers(identity_pb.UnlinkIdentifiersRequest(
        link=identity_pb.IdentifierPair(a=ident("cookie:s-a"), b=ident("email:s-b@example.com")), reason="wrong link"),
        timeout=30)

    def split_applied() -> bool:
        a, b = profile_of(profiles, "cookie:s-a"), profile_of(profiles, "email:s-b@example.com")
        return a.person_id != b.person_id and a.computed.event_count + b.computed.event_count == 3 and (
            a.computed.event_count in (1, 2))
    assert eventually(split_applied)
    names_a = _event_names(profiles, "cookie:s-a")
    names_b = _event_names(profiles, "email:s-b@example.com")
    assert "a_only" in names_a and "b_only" in names_b
    assert "b_only" not in names_a and "a_only" not in names_b
    # The identify event that carried the bad link stays with the person of its strongest identifier.
    assert "identify" in names_a | names_b
    assert link.person_id in (profile_of(profiles, "cookie:s-a").person_id,
                              profile_of(profiles, "email:s-b@example.com").person_id)


def _write_traits(profiles: Stub, traits: dict[str, Any], *, person_id: str = "", identifier: str = "",
                  source: str = "test-writer") -> pb.BatchWriteTraitsResponse:
    write = pb.TraitWrite(person_id=person_id, source=source)
    if identifier:
        write.identifier.CopyFrom(ident(identifier))
    write.traits.update(traits)
    response: pb.BatchWriteTraitsResponse = profiles.BatchWriteTraits(pb.BatchWriteTraitsRequest(writes=[write]),
                                                                      timeout=10)
    return response


def test_trait_writes_follow_their_identifier_or_person_id_through_merge_and_split(
        profiles: Stub, identity: IdentityStub) -> None:
    cookie_person = ingest(profiles, track("cookie:t-a", name="a_only", when="2026-02-01"))[0].person_id
    email_person = ingest(profiles, track("email:t-b@example.com", name="b_only", when="2026-02-02"))[0].person_id
    # Written before the merge by person id alone: stays with that id wherever the id goes.
    _write_traits(profiles, {"email_score": 0.3}, person_id=email_person)
    _write_traits(profiles, {"cookie_score": 0.4}, person_id=cookie_person)
    survivor = ingest(profiles, identify("cookie:t-a", "email:t-b@example.com", when="2026-02-03"))[0].person_id
    assert survivor in (cookie_person, email_person)
    # Written for an identifier: follows it. By the survivor's id alone: stays with the survivor's id.
    _write_traits(profiles, {"device_model": "pixel"}, identifier="cookie:t-a")
    _write_traits(profiles, {"newsletter": True}, identifier="email:t-b@example.com", person_id=survivor)
    _write_traits(profiles, {"churn_score": 0.9}, person_id=survivor)
    merged = profile_of(profiles, "cookie:t-a")
    assert set(merged.traits) == {"email_score", "cookie_score", "device_model", "newsletter", "churn_score"}
    identity.UnlinkIdentifiers(identity_pb.UnlinkIdentifiersRequest(
        link=identity_pb.IdentifierPair(a=ident("cookie:t-a"), b=ident("email:t-b@example.com")),
        reason="wrong link"), timeout=30)

    def split_apart() -> tuple[pb.Profile, pb.Profile] | None:
        a, b = profile_of(profiles, "cookie:t-a"), profile_of(profiles, "email:t-b@example.com")
        applied = a.person_id != b.person_id and a.traits and b.traits and len(a.traits) + len(b.traits) == 5
        return (a, b) if applied else None
    apart = eventually(split_apart)
    assert apart is not None, "the split did not reach the profiles"
    by_cookie, by_email = apart
    # Identity restores the ids the two persons had before the merge.
    assert (by_cookie.person_id, by_email.person_id) == (cookie_person, email_person)
    survivor_traits = {"churn_score"}
    assert set(by_cookie.traits) == {"cookie_score", "device_model"} | (
        survivor_traits if survivor == cookie_person else set())
    assert set(by_email.traits) == {"email_score", "newsletter"} | (
        survivor_traits if survivor == email_person else set())
    assert by_cookie.traits["device_model"].value.string_value == "pixel"
    assert by_email.traits["newsletter"].value.bool_value is True


def test_trait_writes_for_identifiers_nobody_holds_or_another_person_holds_are_refused(profiles: Stub) -> None:
    first = ingest(profiles, track("crm_id:tw-1"))[0].person_id
    ingest(profiles, track("crm_id:tw-2"))
    for identifier, person_id, field in (("crm_id:tw-nobody", "", "writes[0].identifier"),
                                         ("crm_id:tw-2", first, "writes[0].identifier"),
                                         ("", "", "writes[0].person_id")):
        with pytest.raises(grpc.RpcError) as refused:
            _write_traits(profiles, {"x": 1}, identifier=identifier, person_id=person_id)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (refused.value.details() or "")
    assert "x" not in profile_of(profiles, "crm_id:tw-1").traits


def _event_names(profiles: Stub, pair: str) -> set[str]:
    events = profiles.ListProfileEvents(pb.ListProfileEventsRequest(
        person=common_pb2.PersonSelector(identifier=ident(pair))), timeout=10).events
    return {e.event.event_name or pb.EventType.Name(e.event.type).removeprefix("EVENT_TYPE_").lower() for e in events}


def test_erase_removes_the_profile_and_replays_are_refused(profiles: Stub, identity: IdentityStub) -> None:
    replayed = order("email:gone@example.com", order_id="o1", amount=9.0, message_id="erase-me")
    person_id = ingest(profiles, replayed, identify("email:gone@example.com", "cookie:gone-c",
                                                    traits={"name": "Gone"}))[0].person_id
    identity.ErasePerson(identity_pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=person_id),
                                                        reason="privacy request"), timeout=30)

    def erased() -> bool:
        changes = profiles.ListProfileChanges(pb.ListProfileChangesRequest(page_size=1000), timeout=10).changes
        return any(c.type == pb.PROFILE_CHANGE_TYPE_ERASE and c.person_id == person_id for c in changes)
    assert eventually(erased)
    with pytest.raises(grpc.RpcError) as gone:
        profile_of(profiles, "email:gone@example.com")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    again = ingest(profiles, replayed)[0]
    assert again.status == pb.EVENT_STATUS_REJECTED
    assert again.rejection_reason == pb.EVENT_REJECTION_REASON_ERASED_IDENTIFIER


def test_shards_cover_every_profile_exactly_once(profiles: Stub) -> None:
    persons = {ingest(profiles, order(f"crm_id:scan-{i}", order_id=f"o{i}", amount=float(i), when="2026-01-05"))[0]
               .person_id for i in range(30)}
    shards = profiles.ListProfileShards(pb.ListProfileShardsRequest(shard_count=7), timeout=10).shards
    assert len(shards) == 7
    seen: list[str] = []
    for shard in shards:
        for response in profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard, include_events=True,
                                                                     batch_size=4), timeout=30):
            for scanned in response.profiles:
                seen.append(scanned.profile.person_id)
                assert scanned.profile.computed.frequency == 1
                assert [e.event.type for e in scanned.events] == [pb.EVENT_TYPE_ORDER]
    assert sorted(seen) == sorted(persons)
    with pytest.raises(grpc.RpcError) as bad:
        next(iter(profiles.ScanProfiles(pb.ScanProfilesRequest(shard="nope"), timeout=10)))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _scan_all(profiles: Stub, **request: Any) -> dict[str, pb.ScannedProfile]:
    shards = profiles.ListProfileShards(pb.ListProfileShardsRequest(shard_count=3), timeout=10).shards
    return {scanned.profile.person_id: scanned for shard in shards
            for response in profiles.ScanProfiles(pb.ScanProfilesRequest(shard=shard, batch_size=2, **request),
                                                  timeout=30)
            for scanned in response.profiles}


def test_a_scan_reads_only_the_traits_named_and_the_events_selected(profiles: Stub) -> None:
    """A scan with a trait mask, a time range and event names returns what a full scan does, narrowed; and
    computed traits still count every event. Merged persons (rows in several partitions) included."""
    for i in range(8):
        ingest(profiles, identify(f"crm_id:sel-{i}", when="2026-01-03", traits={"plan": f"p{i}", "utm": "mail"}),
               track(f"crm_id:sel-{i}", name="open", when="2026-01-20"),
               order(f"crm_id:sel-{i}", order_id=f"o{i}", amount=5.0 + i, when="2026-02-10"),
               track(f"crm_id:sel-{i}", name="open", when="2026-03-02T10:00"),
               track(f"crm_id:sel-{i}", name="view_item", when="2026-03-03"))
    ingest(profiles, track("cookie:sel-c", name="open", when="2026-02-20"))
    ingest(profiles, identify("cookie:sel-c", "crm_id:sel-0", when="2026-03-04", traits={"plan": "merged"}))
    merged = profile_of(profiles, "crm_id:sel-0")
    assert merged.merged_person_ids
    start = at("2026-02-01")
    full = _scan_all(profiles, include_events=True)
    narrowed_request: dict[str, Any] = {
        "include_events": True, "event_names": ["open", "order"],
        "read_mask": field_mask_pb2.FieldMask(paths=["person_id", "traits.plan"])}
    narrowed = _scan_all(profiles, events_start_time=timestamp(start), **narrowed_request)
    assert set(narrowed) == set(full) and len(full) == 8
    for person_id, scanned in narrowed.items():
        expected = [e for e in full[person_id].events
                    if e.event.event_time.ToDatetime(tzinfo=UTC) >= start and _name(e) in ("open", "order")]
        assert list(scanned.events) == expected and expected
        assert set(scanned.profile.traits) == {"plan"}
        assert scanned.profile.traits["plan"] == full[person_id].profile.traits["plan"]
        assert not scanned.profile.HasField("computed")
    assert [_name(e) for e in narrowed[merged.person_id].events] == ["order", "open", "open"]
    assert narrowed[merged.person_id].profile.traits["plan"].value.string_value == "merged"
    # Computed traits derive from every event, whatever the events returned.
    with_computed = _scan_all(profiles, include_events=True, event_names=["view_item"],
                              read_mask=field_mask_pb2.FieldMask(paths=["person_id", "computed"]))
    for person_id, scanned in with_computed.items():
        assert scanned.profile.computed.event_count == full[person_id].profile.computed.event_count
        assert [e.event.event_name for e in scanned.events] == ["view_item"]
    # BatchGetProfiles selects the same way.
    batch = profiles.BatchGetProfiles(pb.BatchGetProfilesRequest(
        persons=[common_pb2.PersonSelector(person_id=p) for p in sorted(narrowed)], events_start_time=timestamp(start),
        **narrowed_request), timeout=30).results
    assert [list(r.events) for r in batch] == [list(narrowed[p].events) for p in sorted(narrowed)]
    assert all(set(r.profile.traits) == {"plan"} for r in batch)


def _name(stored: pb.StoredEvent) -> str:
    return stored.event.event_name or ("order" if stored.event.type == pb.EVENT_TYPE_ORDER else "")


def timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(when)
    return message


def test_trait_writes_land_on_the_profile_and_unknown_persons_are_refused(profiles: Stub) -> None:
    person_id = ingest(profiles, track("crm_id:w1", name="open"))[0].person_id
    write = pb.TraitWrite(person_id=person_id, source="onecdp-prediction")
    write.traits.update({"score_churn": 0.82})
    response = profiles.BatchWriteTraits(pb.BatchWriteTraitsRequest(writes=[write]), timeout=10)
    assert response.written_count == 1
    trait = profile_of(profiles, "crm_id:w1").traits["score_churn"]
    assert trait.value.number_value == pytest.approx(0.82)
    assert trait.party == common_pb2.DATA_PARTY_FIRST and trait.source == "onecdp-prediction"
    unknown = pb.TraitWrite(person_id="p_nobody")
    unknown.traits.update({"x": 1})
    with pytest.raises(grpc.RpcError) as refused:
        profiles.BatchWriteTraits(pb.BatchWriteTraitsRequest(writes=[write, unknown]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "writes[1].person_id" in (refused.value.details() or "")
    # An id identity calls malformed is refused the same way, naming the write, not as a server error.
    malformed = pb.TraitWrite(person_id="garbage id with spaces")
    malformed.traits.update({"x": 1})
    with pytest.raises(grpc.RpcError) as refused:
        profiles.BatchWriteTraits(pb.BatchWriteTraitsRequest(writes=[unknown, write, malformed]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert "writes[0].person_id" in details and "writes[2].person_id" in details


def test_the_change_feed_is_ordered_and_resumable(profiles: Stub) -> None:
    first = ingest(profiles, identify("crm_id:f1", traits={"plan": "free"}))[0].person_id
    second = ingest(profiles, track("crm_id:f2", name="open"))[0].person_id

    def both() -> list[pb.ProfileChange]:
        changes = list(profiles.ListProfileChanges(pb.ListProfileChangesRequest(page_size=100), timeout=10).changes)
        return changes if {c.person_id for c in changes} >= {first, second} else []
    changes = eventually(both)
    assert [c.person_id for c in changes[:2]] == [first, second]
    assert list(changes[0].trait_names) == ["plan"] and list(changes[1].event_names) == ["open"]
    after_first = profiles.ListProfileChanges(pb.ListProfileChangesRequest(page_token=changes[0].cursor),
                                              timeout=10).changes
    assert after_first[0].cursor == changes[1].cursor
    watched = profiles.WatchProfileChanges(pb.WatchProfileChangesRequest(cursor=changes[0].cursor), timeout=10)
    assert next(iter(watched)).person_id == second
    watched.cancel()


def test_a_scan_reads_every_event_of_timeline_reads_cut_off_by_their_limit(
        profiles: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads over many partitions (the timeline's, the months' and the traits') ask for at most IN_READ_ROWS rows
    (so that Cassandra reads their partitions at once); one that returns that many is read again without the
    limit, so no event is lost whatever the limit."""
    for i in range(5):
        ingest(profiles, *(track(f"crm_id:cut-{i}", name="open", when=f"2026-0{1 + k % 3}-1{k}") for k in range(4)))
    full = _scan_all(profiles, include_events=True)
    monkeypatch.setattr(cassandra, "IN_READ_ROWS", 3)
    cut = _scan_all(profiles, include_events=True)
    assert {p: list(s.events) for p, s in cut.items()} == {p: list(s.events) for p, s in full.items()}
    assert sum(len(s.events) for s in cut.values()) == 20


def test_undoing_a_chain_of_merges_leaves_no_person_claiming_another(profiles: Stub, identity: IdentityStub) -> None:
    # Found by an outside tester: `middle` absorbed `newest`, then `oldest` absorbed `middle`; unlinking both links
    # left middle's profile row listing newest as merged (from the first merge), so middle's profile counted
    # newest's events too, and erasing middle erased newest.
    def person(key: str, name: str, when: str) -> str:
        return ingest(profiles, track(key, name=name, when=when), order(key, order_id=f"o-{name}", amount=10.0,
                                                                         when=when))[0].person_id
    oldest = person("cookie:chain-2", "only_2", "2026-03-01")
    middle = person("cookie:chain-0", "only_0", "2026-03-02")
    newest = person("email:chain-1@example.com", "only_1", "2026-03-03")

    def link(message_id: str, *keys: str) -> None:
        identity.LinkIdentifiers(identity_pb.LinkIdentifiersRequest(observations=[identity_pb.Observation(
            identifiers=[ident(k) for k in keys], provenance=identity_pb.Provenance(message_id=message_id,
                                                                                   source="test"))]), timeout=30)

    def unlink(message_id: str) -> None:
        identity.UnlinkIdentifiers(identity_pb.UnlinkIdentifiersRequest(message_id=message_id, reason="wrong link"),
                                   timeout=30)

    def counts() -> dict[str, tuple[str, int]]:
        return {key: (p.person_id, p.computed.event_count) for key in keys for p in [profile_of(profiles, key)]}
    keys = ("cookie:chain-2", "cookie:chain-0", "email:chain-1@example.com")
    link("chain-link-0", "cookie:chain-0", "email:chain-1@example.com")
    link("chain-link-1", "email:chain-1@example.com", "cookie:chain-2")
    assert eventually(lambda: set(counts().values()) == {(oldest, 6)})
    unlink("chain-link-0")
    assert eventually(lambda: counts()["cookie:chain-0"] == (middle, 2))
    unlink("chain-link-1")
    apart = {"cookie:chain-2": (oldest, 2), "cookie:chain-0": (middle, 2), "email:chain-1@example.com": (newest, 2)}
    assert eventually(lambda: counts() == apart), counts()
    for key in keys:
        assert not profile_of(profiles, key).merged_person_ids
    assert _event_names(profiles, "cookie:chain-0") == {"only_0", "order"}

    identity.ErasePerson(identity_pb.ErasePersonRequest(person=common_pb2.PersonSelector(person_id=middle),
                                                        reason="privacy request"), timeout=30)
    assert eventually(lambda: _profile_gone(profiles, middle))
    survivor = profile_of(profiles, "email:chain-1@example.com")
    assert (survivor.person_id, survivor.computed.event_count) == (newest, 2)


def _profile_gone(profiles: Stub, person_id: str) -> bool:
    try:
        profiles.GetProfile(pb.GetProfileRequest(person=common_pb2.PersonSelector(person_id=person_id)), timeout=10)
    except grpc.RpcError as error:
        return bool(error.code() == grpc.StatusCode.NOT_FOUND)
    return False
