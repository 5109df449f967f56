"""The flightctl service side of a device: the connection, enrolled devices, and waits on them.

Above devices/ (it takes a booted DeviceVM and approves it); flightctl-client is imported only
inside the functions that talk to the service.
"""
