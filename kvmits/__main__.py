import sys

from kvmits.cli import main

sys.exit(main())
