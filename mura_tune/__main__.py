import sys

from mura_tune.cli import main

sys.exit(main())
