import sys

from services.generator.server import main

sys.exit(main())
