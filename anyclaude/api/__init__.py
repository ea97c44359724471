"""The Messages API: wire types, errors, the messages use case and the stream state machine."""
