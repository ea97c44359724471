"""The ASGI transport: routes, body limits, auth, SSE and JSON, disconnects."""
