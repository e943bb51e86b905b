"""The policy server process: its command line and start-up (`main`), the sessions and requests it
serves (`service`), subtask refreshes (`refresh`), and the model-less backend (`fixed_backend`)."""
