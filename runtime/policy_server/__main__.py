"""`python -m runtime.policy_server`: the policy server (`runtime.policy_server.main`)."""

from runtime.policy_server.main import exit_process, main

exit_process(main())
