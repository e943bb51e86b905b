"""`python -m runtime.gateway PROTOCOL ...`: one WebSocket gateway process (`runtime.gateway.main`)."""

import sys

from runtime.gateway.main import main

sys.exit(main())
