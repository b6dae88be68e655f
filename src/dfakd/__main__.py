import sys

from dfakd.cli import main

sys.exit(main())
