import sys

from lmstack.cli import main

sys.exit(main())
