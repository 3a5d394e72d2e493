import sys

from kosmos.eval import main

sys.exit(main())
