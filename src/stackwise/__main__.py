import sys

from stackwise.cli import main

sys.exit(main())
