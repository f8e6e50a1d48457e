"""The gRPC adapter of the segmentation service: onecdp.segmentation.v1 messages in, domain calls, messages out.

Methods not overridden here are inherited from the generated servicer, which answers UNIMPLEMENTED;
the shared interceptor names the method in that message, so nothing pretends to work.
"""

from __future__ import annotations

from functools import partial

from onecdp.segmentation.v1 import segmentation_service_pb2 as pb
from onecdp.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from shared.runner import ServiceContext, ServiceDefinition
from shared.server import ServiceRegistration

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name


class SegmentationServicer(pb_grpc.SegmentationServiceServicer):
    def __init__(self, context: ServiceContext) -> None:
        self._context = context


def build(context: ServiceContext) -> list[ServiceRegistration]:
    # Methods not built yet stay abstract in the typed stubs; at run time they answer UNIMPLEMENTED.
    servicer = SegmentationServicer(context)  # type: ignore[abstract]
    return [ServiceRegistration(SERVICE_NAME, partial(pb_grpc.add_SegmentationServiceServicer_to_server, servicer))]


DEFINITION = ServiceDefinition(name="segmentation", build=build)
