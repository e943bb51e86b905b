"""`python -m runtime.broker`: the name the README gives the standalone fleet broker
(`runtime.fleet.broker_main`), kept as the entry point."""

from runtime.fleet.broker_main import main

if __name__ == "__main__":
    raise SystemExit(main())
