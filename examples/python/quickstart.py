"""mesh from Python grpcio: a rate-limit Check, then a session Create and Validate.

Usage: quickstart.py [USER]            (USER defaults to alice)

Addresses: MESH_RATELIMIT_ADDR (default 127.0.0.1:50052) and MESH_SESSION_ADDR
(default 127.0.0.1:50051), the local stack of deploy/local/up.sh; an http://
prefix is accepted. Needs grpcio and grpcio-reflection (deploy/local/tools.sh
installs both into .local/tools/venv: run this with .local/tools/venv/bin/python).

No generated stubs: the message types come from each server's gRPC reflection
(every mesh service serves it), so nothing here has to be regenerated when the
protos change.
"""

import os
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def address(var, default):
    addr = os.environ.get(var, default)
    return addr.removeprefix("http://").rstrip("/")


class Service:
    """One service's methods, typed from its reflection."""

    def __init__(self, target, service):
        self.channel = grpc.insecure_channel(target)
        self.pool = descriptor_pool.DescriptorPool(
            ProtoReflectionDescriptorDatabase(self.channel)
        )
        self.service = self.pool.FindServiceByName(service)

    def call(self, method, request, timeout=10):
        """Calls `method` with `request` (a dict in the proto's JSON form); the answer as a message."""
        m = self.service.FindMethodByName(method)
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        rpc = self.channel.unary_unary(
            f"/{self.service.full_name}/{method}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        return rpc(json_format.ParseDict(request, req_cls()), timeout=timeout)


def main():
    user = sys.argv[1] if len(sys.argv) > 1 else "alice"

    ratelimit = Service(
        address("MESH_RATELIMIT_ADDR", "127.0.0.1:50052"),
        "mesh.ratelimit.v1.RateLimitService",
    )
    check = ratelimit.call(
        "Check",
        {
            "domain": "api",
            "descriptors": [
                {"entries": [{"key": "route", "value": "search"}, {"key": "user_id", "value": user}]},
                {"entries": [{"key": "endpoint", "value": "search"}]},
            ],
        },
    )
    code = check.DESCRIPTOR.fields_by_name["overall_code"].enum_type
    print(f"ratelimit check: overall {code.values_by_number[check.overall_code].name}")
    for status in check.statuses:
        limit = status.current_limit
        print(f"  {limit.name}: {status.limit_remaining} of {limit.requests_per_unit} remaining")

    session = Service(
        address("MESH_SESSION_ADDR", "127.0.0.1:50051"),
        "mesh.session.v1.SessionService",
    )
    created = session.call(
        "CreateSession",
        {"userId": user, "client": {"ip": "127.0.0.1", "userAgent": "mesh-quickstart.py"}},
    )
    print(f"session created: {created.session.id} for user {created.session.user_id}")
    validated = session.call("ValidateSession", {"token": created.token})
    print(f"session validated: {validated.session.id} of user {validated.session.user_id}")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        print(f"call failed: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
