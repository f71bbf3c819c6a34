import sys

from botkit.cli import main

sys.exit(main())
