"""The robot side: the control loop, its action-chunk buffer, virtual time for tests and the demo,
and the demo's driver with its status line. No JAX: a robot installs `transport` and this."""
