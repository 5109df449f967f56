"""pytest-flightctl-device: real flightctl devices (libvirt VMs) as pytest fixtures."""

from .errors import DeviceError

__all__ = ["DeviceError"]
