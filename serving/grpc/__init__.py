"""The gRPC front end: converters between protobuf and the data plane's types, the one table
from core errors to status codes, and the server that carries both services."""
