"""Parts of the flightctl FAKE (tests/support/flightctl_emulator.py): status bodies, schema checks
against flightctl-client's models, selectors and JSON patch, the scratch PKI.

Not named `flightctl`, so it can never shadow the real client package on sys.path.
"""
