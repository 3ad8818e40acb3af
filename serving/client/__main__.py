"""`python -m serving.client ...` is `cnn-predict ...`."""

import sys

from serving.client.predict import predict_main

# Only as `python -m`: importing the module (as a check that imports every module does)
# runs nothing.
if __name__ == "__main__":
    sys.exit(predict_main())
