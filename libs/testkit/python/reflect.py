"""Resolves everything a gRPC server lists through its reflection, with grpcio.

Usage: reflect.py HOST:PORT VERSION [SYMBOL ...]

VERSION is `v1` (grpc.reflection.v1.ServerReflection) or `v1alpha`. Lists the
services, then builds each listed service's file, with every file it imports,
into a fresh protobuf DescriptorPool and resolves each method's request and
response types; then does the same for each extra SYMBOL (a message, e.g.
google.rpc.BadRequest). Prints one line per resolved symbol and exits 0, or
prints what failed and exits 1.

grpcio-reflection ships the v1alpha messages only; v1's are the same on the
wire, so they serve both versions here (only the method path differs).
"""

import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as pb


class Reflection:
    def __init__(self, target, version):
        self.channel = grpc.insecure_channel(target)
        self.call = self.channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=pb.ServerReflectionRequest.SerializeToString,
            response_deserializer=pb.ServerReflectionResponse.FromString,
        )
        self.pool = descriptor_pool.DescriptorPool()
        self.added = set()

    def ask(self, request):
        (response,) = list(self.call(iter([request]), timeout=10))
        if response.HasField("error_response"):
            e = response.error_response
            raise LookupError(f"{request}: error {e.error_code}: {e.error_message}")
        return response

    def services(self):
        r = self.ask(pb.ServerReflectionRequest(list_services=""))
        return [s.name for s in r.list_services_response.service]

    def add_files(self, response):
        protos = {}
        for raw in response.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            protos[fd.name] = fd
        for name in list(protos):
            self.add_file(name, protos)

    def add_file(self, name, protos):
        """Adds `name` after its imports (asking for any not yet sent)."""
        if name in self.added:
            return
        if name not in protos:
            r = self.ask(pb.ServerReflectionRequest(file_by_filename=name))
            for raw in r.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                protos.setdefault(fd.name, fd)
            if name not in protos:
                raise LookupError(f"file {name} not sent")
        for dep in protos[name].dependency:
            self.add_file(dep, protos)
        self.pool.Add(protos[name])
        self.added.add(name)

    def symbol(self, name):
        self.add_files(self.ask(pb.ServerReflectionRequest(file_containing_symbol=name)))


def main():
    target, version, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    r = Reflection(target, version)
    failed = False
    for service in r.services():
        try:
            r.symbol(service)
            svc = r.pool.FindServiceByName(service)
            print(f"service {service}")
            for m in svc.methods:
                print(f"method {m.full_name} {m.input_type.full_name} {m.output_type.full_name}")
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            print(f"FAILED {service}: {e}")
            failed = True
    for name in extra:
        try:
            r.symbol(name)
            print(f"message {r.pool.FindMessageTypeByName(name).full_name}")
        except Exception as e:  # noqa: BLE001
            print(f"FAILED {name}: {e}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
