import sys

from kosmos.eval.loss import main

sys.exit(main())
