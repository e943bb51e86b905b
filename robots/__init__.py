"""The robot side: the `Robot` interface, the simulated robot and adapters for real robot layouts."""
