"""The robot side: the `Robot` interface, the simulated robot, adapters for real robot layouts and
LeRobot's robots."""
