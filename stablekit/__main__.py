import sys

from stablekit.cli import main

sys.exit(main())
