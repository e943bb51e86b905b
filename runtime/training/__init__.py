"""Training the demo policy on the simulated task: the one place that imports both the model
(`policy`) and the simulator (`robots`)."""
