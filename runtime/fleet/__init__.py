"""The fleet: a broker in front of many policy workers. The broker and its routing and heartbeats, the
front host that starts workers, the workers' processes, and a worker's link to its broker."""
