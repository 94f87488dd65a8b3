"""`python -m nodeagent` runs the agent, like `meshvpn-agent`."""

import sys

from nodeagent.cli import main

sys.exit(main())
