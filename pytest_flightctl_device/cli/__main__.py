"""`python -m pytest_flightctl_device.cli`: the same as the flightctl-device command."""

import sys

from pytest_flightctl_device.cli import main

sys.exit(main())
