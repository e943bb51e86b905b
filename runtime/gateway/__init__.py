"""The WebSocket gateway processes (the JSON API, openpi's protocol) of a policy server or a front host:
the process itself (`main`) and its supervisor in the parent (`supervisor`)."""
