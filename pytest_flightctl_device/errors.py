"""The exceptions users see.

Every message is one sentence that names the input at fault and the fix; none carries a token,
a private key or user-data. One base class lets a suite catch everything the plugin raises.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base of every error the plugin raises on purpose."""


class ConfigError(DeviceError):
    """A setting, file or argument given by the user is wrong; raised before anything boots."""


class MissingToolError(DeviceError):
    """A prerequisite (qemu, libvirt, podman, ...) is absent: a skip locally, an error under require."""


class AgentConfigError(ConfigError):
    """The agent config or certificates are malformed, mismatched or expired."""


class ArtifactError(DeviceError):
    """An artifact could not be obtained or failed verification."""


class GitHubError(ArtifactError):
    """GitHub's API refused or could not answer a request for an artifact."""


class PodmanError(DeviceError):
    """podman could not build, load, save or run what was asked."""


class BootError(DeviceError):
    """A device VM failed to start or to become ready; the message quotes the console tail."""


class ServiceConnectionError(ConfigError):
    """The flightctl service is unreachable, its TLS certificate is not trusted, or it refused the token."""


class DeviceStateError(DeviceError):
    """An enrolled device did not reach the state a wait asked for; the message quotes its conditions."""


class GuestCommandError(DeviceError):
    """A command run in a device VM exited non-zero while check=True."""

    def __init__(self, message: str, *, exit_code: int, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
