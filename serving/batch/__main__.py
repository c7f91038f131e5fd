"""``python -m serving.batch ...``: the batch job's command line (see :mod:`serving.batch.driver`)."""

import sys

from serving.batch.driver import main

sys.exit(main())
