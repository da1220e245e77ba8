import sys

from attncontrol.cli import main

sys.exit(main())
