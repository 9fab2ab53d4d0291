"""A generic gRPC client with no proto file: discovers presenced's API through server
reflection, builds the message classes from the served descriptors, and calls GetPresence.
Usage: reflection_client.py HOST:PORT USER_ID  (prints one JSON line)."""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

target, user = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel(target)
db = ProtoReflectionDescriptorDatabase(channel)
services = list(db.get_services())
pool = descriptor_pool.DescriptorPool(db)
service = pool.FindServiceByName("realchat.presence.v1.PresenceApi")
method = service.methods_by_name["GetPresence"]
Request = message_factory.GetMessageClass(method.input_type)
Response = message_factory.GetMessageClass(method.output_type)
call = channel.unary_unary(
    f"/{service.full_name}/{method.name}",
    request_serializer=Request.SerializeToString,
    response_deserializer=Response.FromString,
)
request = Request()
request.user_ids.append(user)
response = call(request, timeout=10)
print(json.dumps({"services": services, "response": json_format.MessageToDict(response)}))
