import sys

from services.scorer.server import main

sys.exit(main())
