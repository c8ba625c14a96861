"""`python -m server ...` runs the same server as `jaxserve serve ...`."""
import sys

from server.cli import main

sys.exit(main())
