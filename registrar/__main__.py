"""`python -m registrar` is `meshvpn-registrar`."""

import sys

from registrar.cli import main

sys.exit(main())
