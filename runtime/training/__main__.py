"""`python -m runtime.training`: trains the demo policy (`runtime.training.train_demo`)."""

import sys

from runtime.training.train_demo import main

sys.exit(main())
