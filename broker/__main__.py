"""`python -m broker`: the same as `meshvpn-broker`."""

from broker.cli import main

raise SystemExit(main())
