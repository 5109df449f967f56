"""One frozen Settings object, resolved once: command-line option > env var > ini key > default.

Every knob is declared once in KNOBS; the pytest options, the env vars, the ini keys, the
Settings defaults, the README table and the flightctl-device options all derive from that list,
so they cannot drift apart. Both fronts (plugin.py and cli/) only collect raw values and call
Settings.resolve(). Messages name a knob as `--device-NAME` (the pytest spelling); the CLI
renders that as the flag its subcommand registered (cli/options.render).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pytest_flightctl_device.errors import ConfigError

if TYPE_CHECKING:
    from pytest_flightctl_device.artifacts.cache import Cache

ENV_PREFIX = "FLIGHTCTL_DEVICE_"
VARIANTS = ("base", "v2", "v3", "v4")


# -- parsers: each turns the raw text into a value or raises ValueError(why, with the fix) --------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not a whole number; give a positive whole number") from None
    if value <= 0:
        raise ValueError("must be greater than zero; give a positive whole number")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a number; give a positive number") from None
    if value <= 0:
        raise ValueError("must be greater than zero; give a positive number")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("is not a yes/no value; use 1/0, true/false or yes/no")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"is not one of {', '.join(choices)}; pick one of those")
        return text

    return parse


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https")


def _file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError("is not an existing file; give the path of a readable file")
    if not os.access(path, os.R_OK):
        raise ValueError("is not readable; fix its permissions or give another file")
    return path.resolve()


def _file_or_url(text: str) -> str:
    if _is_url(text):
        return text
    return str(_file(text))


def _directory(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ValueError("is not an existing directory; give the path of a directory")
    return path.resolve()


def _dir_path(text: str) -> Path:
    """A directory that may not exist yet (created on first use)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError("exists and is not a directory; give a directory path")
    return path.absolute()


def _https_url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme != "https" or not parsed.hostname:
        raise ValueError("is not an https:// URL; give the enrollment service as https://host:port")
    return text.rstrip("/")


def _http_url(text: str) -> str:
    if not _is_url(text) or not urlparse(text).hostname:
        raise ValueError("is not an http(s) URL; give a URL such as https://api.github.com")
    return text.rstrip("/")


def _api_url(text: str) -> str:
    if not _is_url(text) or not urlparse(text).hostname:
        raise ValueError("is not an http(s) URL; give the flightctl API as https://host:port")
    return text.rstrip("/")


def _sha256(text: str) -> str:
    value = text.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("is not a sha256 digest; give 64 hexadecimal characters")
    return value


def _repo(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", text):
        raise ValueError("is not OWNER/NAME; give a repository such as flightctl/flightctl")
    return text


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise ValueError("is not a TCP port; give a number from 1 to 65535")
    return value


def _registry(text: str) -> str:
    """HOST:PORT[/NAMESPACE]: a registry address (IPv6 in brackets) and an optional path prefix."""
    value = text.strip().removeprefix("docker://").rstrip("/")
    address, _, namespace = value.partition("/")
    host, _, port = address.rpartition(":")
    host_ok = re.fullmatch(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host or "")
    if not host_ok or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError("is not HOST:PORT[/NAMESPACE]; give the registry as HOST:PORT, such as 127.0.0.1:5000")
    component = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    if namespace and not re.fullmatch(rf"{component}(?:/{component})*", namespace):
        raise ValueError("has a NAMESPACE that is not a lower-case repository path; give one such as ci/flightctl")
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty; give a value or leave the option out")
    return text.strip()


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(part for part in re.split(r"[,\s]+", text) if part)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or "base" not in names:
        raise ValueError(f"must list variants from {', '.join(VARIANTS)} including base")
    return names


def default_cache_dir() -> Path:
    """XDG for users; /var/cache for root, whose qemu (another user) cannot traverse /root."""
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "pytest-flightctl-device"
    if os.getuid() == 0:
        return Path("/var/cache/pytest-flightctl-device")
    return Path.home() / ".cache" / "pytest-flightctl-device"


def default_workdir() -> Path:
    return Path("/var/tmp") / f"pytest-flightctl-device-{os.getuid()}"


def default_libvirt_uri() -> str:
    return "qemu:///system" if os.getuid() == 0 else "qemu:///session"


@dataclass(frozen=True)
class Knob:
    """One setting: its name gives --device-NAME, FLIGHTCTL_DEVICE_NAME and ini key device_name."""

    name: str
    help: str
    parse: Callable[[str], Any]
    default: Any = None
    default_text: str = ""
    flag: bool = False
    multi: bool = False
    metavar: str = "VALUE"

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def cli(self) -> str:
        return f"--device-{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.attr.upper()

    @property
    def ini(self) -> str:
        return f"device_{self.attr}"

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def help_text(self) -> str:
        """The help line, with the default when there is one worth saying."""
        default = self.default_text or ("" if self.flag or self.default is None or callable(self.default)
                                        else _shown(self.default))
        return f"{self.help.removesuffix('.')} (default {default})." if default else self.help

    def option_kwargs(self) -> dict[str, Any]:
        """argparse keywords for this knob's option: unset stays None, so env, ini and default apply."""
        if self.flag:
            return {"action": "store_true", "default": None}
        if self.multi:
            return {"action": "append", "default": None, "metavar": self.metavar}
        return {"default": None, "metavar": self.metavar}


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


KNOBS: tuple[Knob, ...] = (
    # -- the device VM -----------------------------------------------------------------------
    Knob("qcow2", "Device disk image: a local qcow2 path or an http(s) URL.", _file_or_url,
         metavar="PATH|URL"),
    Knob("agent-config", "Agent config.yaml as written by `flightctl certificate request --output "
         "embedded`.", _file, metavar="FILE"),
    Knob("agent-certs", "Directory with ca.crt, client-enrollment.crt and client-enrollment.key "
         "(needs --device-enrollment-server).", _directory, metavar="DIR"),
    Knob("enrollment-server", "Enrollment service URL (https://host:port) for --device-agent-certs.",
         _https_url, metavar="URL"),
    Knob("accel", "Acceleration: auto probes KVM for real and falls back to TCG.",
         _choice("auto", "kvm", "tcg"), "auto", metavar="auto|kvm|tcg"),
    Knob("libvirt-uri", "libvirt connection URI (repeatable: each boot goes to a host with room; a remote "
         "qemu+ssh://USER@HOST[:PORT]/system[?keyfile=FILE] gets the base image uploaded once).", _text,
         lambda: (default_libvirt_uri(),), "qemu:///system as root, else qemu:///session", multi=True,
         metavar="URI"),
    Knob("libvirt-pool", "Storage pool on remote libvirt hosts for the base image, overlays and seeds; "
         "default a dir pool `fcdev` at /var/lib/libvirt/images/fcdev that the plugin creates.", _text,
         metavar="NAME"),
    Knob("memory-mib", "Guest memory in MiB.", _positive_int, 2048, metavar="MIB"),
    Knob("vcpus", "Guest vCPUs.", _positive_int, 2, metavar="N"),
    Knob("boot-timeout", "Seconds for a device to become ready (multiplied by 4 under TCG).",
         _positive_float, 180.0, metavar="SECONDS"),
    Knob("keep-vm", "Keep a failed test's VM running and print its ssh command.", _bool, False,
         flag=True),
    Knob("workdir", "Directory for overlays, seeds, console logs and SSH keys.", _dir_path,
         default_workdir, "/var/tmp/pytest-flightctl-device-UID", metavar="DIR"),
    Knob("require", "Treat a missing prerequisite (qemu, libvirt, podman) as an error, not a skip.",
         _bool, False, flag=True),
    Knob("network", "Guest network: user (reaches the host at 10.0.2.2 and beyond) or isolated "
         "(qemu restrict=on: nothing leaves the guest).", _choice("user", "isolated"), "user",
         metavar="user|isolated"),
    Knob("host-forward", "Host loopback port made reachable in the guest at 127.0.0.1:PORT "
         "(repeatable).", _port, (), "none", multi=True, metavar="PORT"),
    Knob("registry", "Registry (HOST:PORT[/NAMESPACE]) agent_registry pushes the bundle to and devices "
         "pull the variants from; default a private registry on 127.0.0.1 for the session.", _registry,
         metavar="HOST:PORT[/NS]"),
    Knob("registry-ca", "CA certificate (PEM) of a TLS --device-registry, also installed in the devices.",
         _file, metavar="FILE"),
    Knob("registry-insecure", "--device-registry speaks plain HTTP (devices get insecure = true).", _bool,
         False, flag=True),
    Knob("firmware", "Guest firmware.", _choice("bios", "uefi"), "bios", metavar="bios|uefi"),
    Knob("prefetch", "Boot the next default device in the background while a test runs, so the next "
         "request is served at once (one spare VM per worker, holding a --device-max-vms slot).", _bool,
         False, flag=True),
    Knob("max-vms", "Device VMs running at once across all runs sharing the workdir; more boots queue.",
         _positive_int, None, "from available memory and the VM size", metavar="N"),
    Knob("fresh", "How each test's device is made fresh: boot (a cold boot) or snapshot (a clone of a "
         "template booted once per worker and device shape, given its own identity; the marker's fresh=).",
         _choice("boot", "snapshot"), "boot", metavar="boot|snapshot"),
    # -- the flightctl service: enrolled_device (the token only from FLIGHTCTL_TOKEN) ------------
    Knob("flightctl-api", "flightctl API URL for enrolled_device; the token comes from FLIGHTCTL_TOKEN.",
         _api_url, default_text="service.server of the client config", metavar="URL"),
    Knob("flightctl-ca", "CA certificate (PEM) of the flightctl API.", _file,
         default_text="the client config's, else the system's", metavar="FILE"),
    Knob("flightctl-client-config", "client.yaml written by `flightctl login` (server, CA, token).", _file,
         default_text="~/.config/flightctl/client.yaml when it exists", metavar="FILE"),
    # -- artifacts: where the images bundle and the qcow2 come from --------------------------
    Knob("bundle", "Agent images bundle (`podman save -m` tar): a local path or an http(s) URL.",
         _file_or_url, metavar="PATH|URL"),
    Knob("bundle-sha256", "Expected sha256 of the bundle.", _sha256, metavar="HEX"),
    Knob("qcow2-sha256", "Expected sha256 of the qcow2.", _sha256, metavar="HEX"),
    Knob("github-run", "Take both artifacts from this GitHub Actions run.", _positive_int,
         metavar="RUN_ID"),
    Knob("github-pr", "Take both artifacts from the newest artifacts-workflow run for this pull "
         "request's head commit.", _positive_int, metavar="N"),
    Knob("github-ref", "Take both artifacts from the newest artifacts-workflow run for this branch "
         "or commit sha.", _text, metavar="BRANCH|SHA"),
    Knob("github-repo", "Repository of --device-github-run/pr/ref.", _repo, "flightctl/flightctl",
         metavar="OWNER/NAME"),
    Knob("github-workflow", "Workflow file that builds the artifacts.", _text,
         "pr-build-artifacts.yaml", metavar="FILE"),
    Knob("github-api-url", "GitHub API base URL (GitHub Enterprise, tests).", _http_url,
         "https://api.github.com", metavar="URL"),
    Knob("bundle-artifact", "Name prefix of the bundle artifact.", _text, "agent-images-bundle",
         metavar="PREFIX"),
    Knob("qcow2-artifact", "Name prefix of the qcow2 artifact.", _text, "agent-qcow2-image",
         metavar="PREFIX"),
    Knob("cache-dir", "Content-addressed artifact cache shared by workers and runs.", _dir_path,
         default_cache_dir, "$XDG_CACHE_HOME/pytest-flightctl-device (root: /var/cache/...)",
         metavar="DIR"),
    Knob("cache-max-gb", "Prune least recently used cache entries above this size.",
         _positive_float, metavar="GB"),
    # -- images: local build, podman, bootc-image-builder -------------------------------------
    Knob("build", "Build the images and the qcow2 locally from containerfiles/ instead of "
         "downloading.", _bool, False, flag=True),
    Knob("build-jobs", "Variant images built in parallel.", _positive_int, 4, metavar="N"),
    Knob("containerfiles", "Directory with Containerfile-base, -v2, -v3, -v4.", _directory,
         metavar="DIR", default_text="the repository's containerfiles/"),
    Knob("rpms", "Directory of agent RPMs for the base image (else the COPR repository).",
         _directory, metavar="DIR"),
    Knob("base-image", "bootc base image of Containerfile-base.", _text,
         "quay.io/centos-bootc/centos-bootc:stream9", metavar="REF"),
    Knob("image-repo", "Repository of the device image tags.", _text,
         "quay.io/flightctl/flightctl-device", metavar="REPO"),
    Knob("image-tag", "Tag suffix of the device images (<variant>-<tag>); default from git "
         "describe.", _text, metavar="TAG"),
    Knob("variants", "Variants expected in the bundle and built locally.", _variants,
         VARIANTS, "base,v2,v3,v4", metavar="LIST"),
    Knob("podman-url", "podman API service URL; default CONTAINER_HOST or the default socket, "
         "else a private service for the session.", _text, metavar="URL"),
    Knob("bib-image", "bootc-image-builder image.", _text,
         "quay.io/centos-bootc/bootc-image-builder:latest", metavar="REF"),
    Knob("bib-config", "config.toml for bootc-image-builder.", _file, metavar="FILE"),
    Knob("bib-timeout", "Seconds bootc-image-builder may run.", _positive_float, 3600.0,
         metavar="SECONDS"),
)

_BY_ATTR = {knob.attr: knob for knob in KNOBS}


def _default(attr: str) -> Callable[[], Any]:
    """The default factory of a Settings field: the knob's own default, so Settings() == resolve({}, {}, {})."""
    return _BY_ATTR[attr].default_value


@dataclass(frozen=True)
class Settings:
    """Resolved settings; build with Settings.resolve(), change with dataclasses.replace()."""

    qcow2: str | None = field(default_factory=_default("qcow2"))
    agent_config: Path | None = field(default_factory=_default("agent_config"))
    agent_certs: Path | None = field(default_factory=_default("agent_certs"))
    enrollment_server: str | None = field(default_factory=_default("enrollment_server"))
    accel: str = field(default_factory=_default("accel"))
    libvirt_uri: tuple[str, ...] = field(default_factory=_default("libvirt_uri"))
    libvirt_pool: str | None = field(default_factory=_default("libvirt_pool"))
    memory_mib: int = field(default_factory=_default("memory_mib"))
    vcpus: int = field(default_factory=_default("vcpus"))
    boot_timeout: float = field(default_factory=_default("boot_timeout"))
    keep_vm: bool = field(default_factory=_default("keep_vm"))
    workdir: Path = field(default_factory=_default("workdir"))
    require: bool = field(default_factory=_default("require"))
    network: str = field(default_factory=_default("network"))
    host_forward: tuple[int, ...] = field(default_factory=_default("host_forward"))
    registry: str | None = field(default_factory=_default("registry"))
    registry_ca: Path | None = field(default_factory=_default("registry_ca"))
    registry_insecure: bool = field(default_factory=_default("registry_insecure"))
    firmware: str = field(default_factory=_default("firmware"))
    prefetch: bool = field(default_factory=_default("prefetch"))
    max_vms: int | None = field(default_factory=_default("max_vms"))
    fresh: str = field(default_factory=_default("fresh"))
    flightctl_api: str | None = field(default_factory=_default("flightctl_api"))
    flightctl_ca: Path | None = field(default_factory=_default("flightctl_ca"))
    flightctl_client_config: Path | None = field(default_factory=_default("flightctl_client_config"))
    bundle: str | None = field(default_factory=_default("bundle"))
    bundle_sha256: str | None = field(default_factory=_default("bundle_sha256"))
    qcow2_sha256: str | None = field(default_factory=_default("qcow2_sha256"))
    github_run: int | None = field(default_factory=_default("github_run"))
    github_pr: int | None = field(default_factory=_default("github_pr"))
    github_ref: str | None = field(default_factory=_default("github_ref"))
    github_repo: str = field(default_factory=_default("github_repo"))
    github_workflow: str = field(default_factory=_default("github_workflow"))
    github_api_url: str = field(default_factory=_default("github_api_url"))
    bundle_artifact: str = field(default_factory=_default("bundle_artifact"))
    qcow2_artifact: str = field(default_factory=_default("qcow2_artifact"))
    cache_dir: Path = field(default_factory=_default("cache_dir"))
    cache_max_gb: float | None = field(default_factory=_default("cache_max_gb"))
    build: bool = field(default_factory=_default("build"))
    build_jobs: int = field(default_factory=_default("build_jobs"))
    containerfiles: Path | None = field(default_factory=_default("containerfiles"))
    rpms: Path | None = field(default_factory=_default("rpms"))
    base_image: str = field(default_factory=_default("base_image"))
    image_repo: str = field(default_factory=_default("image_repo"))
    image_tag: str | None = field(default_factory=_default("image_tag"))
    variants: tuple[str, ...] = field(default_factory=_default("variants"))
    podman_url: str | None = field(default_factory=_default("podman_url"))
    bib_image: str = field(default_factory=_default("bib_image"))
    bib_config: Path | None = field(default_factory=_default("bib_config"))
    bib_timeout: float = field(default_factory=_default("bib_timeout"))

    @classmethod
    def resolve(
        cls,
        cli: Mapping[str, Any],
        env: Mapping[str, str],
        ini: Mapping[str, Any],
    ) -> Settings:
        """Pick each knob's value by precedence and parse it; raise ConfigError naming the option.

        `cli` and `ini` are keyed by the knob's attribute name; None (or an empty list) means unset.
        """
        values: dict[str, Any] = {}
        for knob in KNOBS:
            values[knob.attr] = _resolve_one(knob, cli.get(knob.attr), env.get(knob.env),
                                             ini.get(knob.attr))
        settings = cls(**values)
        settings._check_combinations()
        return settings

    def __post_init__(self) -> None:
        if isinstance(self.libvirt_uri, str):  # one URI given in code (Settings(libvirt_uri="..."))
            object.__setattr__(self, "libvirt_uri", (self.libvirt_uri,))

    def _check_combinations(self) -> None:
        if len(set(self.libvirt_uri)) != len(self.libvirt_uri):
            raise ConfigError("--device-libvirt-uri names the same URI twice; give each libvirt host once.")
        if self.agent_config and self.agent_certs:
            raise ConfigError(
                "--device-agent-config and --device-agent-certs were both given; "
                "give the config.yaml or the certs directory, not both."
            )
        if self.agent_certs and not self.enrollment_server:
            raise ConfigError(
                "--device-agent-certs needs --device-enrollment-server; "
                "give the enrollment service URL (https://host:port)."
            )

        if (self.registry_ca or self.registry_insecure) and not self.registry:
            given = "--device-registry-ca" if self.registry_ca else "--device-registry-insecure"
            raise ConfigError(f"{given} was given without --device-registry; give the registry as "
                              "--device-registry HOST:PORT, or drop it to use the private registry.")
        if self.registry_ca and self.registry_insecure:
            raise ConfigError("--device-registry-ca and --device-registry-insecure were both given; "
                              "give the CA for a TLS registry or the flag for a plain HTTP one, not both.")

        github = [k for k in ("github_run", "github_pr", "github_ref") if getattr(self, k) is not None]
        if len(github) > 1:
            names = " and ".join(knob(k).cli for k in github)
            raise ConfigError(f"{names} were both given; pick one GitHub source.")
        downloads = [k for k in ("bundle", "qcow2", *github) if getattr(self, k) is not None]
        if self.build and downloads:
            names = " and ".join(knob(k).cli for k in downloads)
            raise ConfigError(
                f"--device-build was given together with a download source; "
                f"drop --device-build or {names}."
            )

    # -- paths derived from the settings: built here only -------------------------------------

    def cache(self) -> Cache:
        """The artifact cache under cache_dir, pruned to cache_max_gb when that is set."""
        from pytest_flightctl_device.artifacts.cache import Cache

        max_gb = self.cache_max_gb
        return Cache(self.cache_dir, max_bytes=int(max_gb * 1e9) if max_gb else None)

    @property
    def locks_dir(self) -> Path:
        """Cross-process locks (image loads and builds) beside the cache's own."""
        return self.cache().locks

    @property
    def accel_file(self) -> Path:
        """The remembered KVM verdict, shared by every run on this host that shares the cache."""
        return self.cache_dir / "accel.json"


def _source_text(knob: Knob, source: str) -> str:
    return {"cli": knob.cli, "env": f"{knob.env} (for {knob.cli})",
            "ini": f"ini key {knob.ini} (for {knob.cli})"}[source]


def _parse_one(knob: Knob, raw: Any, source: str) -> Any:
    items = list(raw) if isinstance(raw, list | tuple) else [raw]
    if knob.multi and source != "cli":
        items = [part for item in items for part in re.split(r"[,\s]+", str(item)) if part]
    parsed = []
    for item in items:
        if isinstance(item, bool):
            parsed.append(item)
            continue
        try:
            parsed.append(knob.parse(str(item)))
        except ValueError as exc:
            raise ConfigError(f"{_source_text(knob, source)} {str(item)!r} {exc}.") from None
    return tuple(parsed) if knob.multi else parsed[0]


def _resolve_one(knob: Knob, cli_value: Any, env_value: str | None, ini_value: Any) -> Any:
    for source, raw in (("cli", cli_value), ("env", env_value), ("ini", ini_value)):
        if raw is None or raw == [] or raw == "":
            continue
        return _parse_one(knob, raw, source)
    return knob.default_value()


def knob(attr: str) -> Knob:
    return _BY_ATTR[attr]


def markdown_table() -> str:
    """The README's options table, generated so it always matches KNOBS."""
    rows = ["| CLI option | env var | ini key | default | meaning |", "|---|---|---|---|---|"]
    for k in KNOBS:
        default = k.default_text or ("off" if k.flag else "" if k.default is None else str(k.default))
        option = k.cli if k.flag else f"{k.cli} {k.metavar}"
        rows.append(f"| `{option}` | `{k.env}` | `{k.ini}` | {default or '-'} | {k.help} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - used to refresh the README table
    print(markdown_table())
