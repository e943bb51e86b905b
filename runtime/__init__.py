"""The processes: the policy server wiring engine and transports, robot sessions, the refresh
scheduler, the action-chunk buffer and the control loop."""
