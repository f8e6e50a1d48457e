"""Email values: a `mailto:` URI is the address it holds, and the local part is a dot-atom (no leading,
trailing or doubled dot), while lower-casing, plus tags and internationalized domains work as before."""

from __future__ import annotations

import grpc
import pytest
from onecdp.identity.v1 import identity_service_pb2_grpc as pb_grpc

from services.identity.identifiers import IdentifierRegistry, InvalidIdentifierValue
from tests.services.identity.conftest import failure, link, observation, person_of


@pytest.mark.unit
@pytest.mark.parametrize(("raw", "normalized"), [
    ("mailto:a@x.com", "a@x.com"),
    ("MailTo:Ann.Lee+News@Example.COM", "ann.lee+news@example.com"),
    ("mailto:张伟@例子.中国", "张伟@xn--fsqu00a.xn--fiqs8s"),
    # What worked before still does.
    ("Ann.Lee+News@Example.COM", "ann.lee+news@example.com"),
    ("a.b.c@x.com", "a.b.c@x.com"),
    ("Muller@Exämple.DE", "muller@xn--exmple-cua.de"),
    ('"a..b"@x.com', '"a..b"@x.com'),  # a quoted local part may hold any dots (RFC 5322 quoted-string)
])
def test_accepted_emails_normalize_to_one_identifier(raw: str, normalized: str) -> None:
    assert IdentifierRegistry().normalize("email", raw) == normalized


@pytest.mark.unit
@pytest.mark.parametrize(("raw", "problem"), [
    ("a..b@x.com", "two dots in a row"),
    (".a@x.com", "starts with a dot"),
    ("a.@x.com", "ends with a dot"),
    ("mailto:a..b@x.com", "two dots in a row"),
    ("mailto:", "expected local@domain.tld"),
    ("mailto:a@x.com?subject=hi", "expected local@domain.tld"),
])
def test_a_malformed_local_part_is_refused_saying_why(raw: str, problem: str) -> None:
    with pytest.raises(InvalidIdentifierValue) as caught:
        IdentifierRegistry().normalize("email", raw)
    assert problem in str(caught.value) and repr(raw) in str(caught.value)


@pytest.mark.integration
def test_a_mailto_uri_links_as_the_address_it_holds(identity: pb_grpc.IdentityServiceStub) -> None:
    (result,) = link(identity, observation("email:mailto:Zoe@Example.com", "cookie:zoe-web"))
    assert [(i.type, i.value) for i in result.normalized_identifiers if i.type == "email"] == [
        ("email", "zoe@example.com")]
    assert person_of(identity, "email:zoe@example.com").person_id == result.person_id
    code, _, fields = failure(lambda: link(identity, observation("email:zoe..x@example.com", "cookie:zoe-web")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields and fields[0].endswith(".value")
