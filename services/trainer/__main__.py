import sys

from services.trainer.server import main

sys.exit(main())
