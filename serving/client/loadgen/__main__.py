"""`python -m serving.client.loadgen ...` is `cnn-bench ...`."""

import sys

from serving.client.loadgen.cli import main

# Only as `python -m`: importing the module (as a check that imports every module does)
# runs nothing.
if __name__ == "__main__":
    sys.exit(main())
