"""`python -m serving.client ...` is `cnn-predict ...`."""

import sys

from serving.client.predict import predict_main

sys.exit(predict_main())
