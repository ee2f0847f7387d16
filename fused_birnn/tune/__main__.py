"""`python -m fused_birnn.tune --show`: backend='auto''s decisions (see `fused_birnn.tune`)."""

import sys

from . import main

sys.exit(main())
