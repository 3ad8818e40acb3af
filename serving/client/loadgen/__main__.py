"""`python -m serving.client.loadgen ...` is `cnn-bench ...`."""

import sys

from serving.client.loadgen.cli import main

sys.exit(main())
