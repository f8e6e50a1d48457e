"""The gRPC adapter of the profile service: onecdp.profile.v1 messages in, domain calls, messages out.

Methods not overridden here are inherited from the generated servicer, which answers UNIMPLEMENTED;
the shared interceptor names the method in that message, so nothing pretends to work.
"""

from __future__ import annotations

from functools import partial

from onecdp.profile.v1 import profile_service_pb2 as pb
from onecdp.profile.v1 import profile_service_pb2_grpc as pb_grpc

from shared.runner import ServiceContext, ServiceDefinition
from shared.server import ServiceRegistration

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProfileService"].full_name


class ProfileServicer(pb_grpc.ProfileServiceServicer):
    def __init__(self, context: ServiceContext) -> None:
        self._context = context


def build(context: ServiceContext) -> list[ServiceRegistration]:
    # Methods not built yet stay abstract in the typed stubs; at run time they answer UNIMPLEMENTED.
    servicer = ProfileServicer(context)  # type: ignore[abstract]
    return [ServiceRegistration(SERVICE_NAME, partial(pb_grpc.add_ProfileServiceServicer_to_server, servicer))]


DEFINITION = ServiceDefinition(name="profile", build=build)
