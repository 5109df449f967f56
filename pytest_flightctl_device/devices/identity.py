"""A clone's own identity: the commands that hold the agent in a template and make a clone new.

A template boots once with the agent held back (so it makes no key, no CSR, no enrollment request
before the snapshot); every clone reverted from it then gets, before anything else runs in it:
host entropy mixed into the kernel's pool and the CRNG reseeded (else every clone draws the same
random bytes, so the agent makes the same key and device name), the clock set from the host (a
reverted clock is as old as the snapshot, which breaks TLS), a new machine-id and hostname, and
then the agent started. The same script checks the revert took: the marker the previous clone
wrote must be gone. Pure text here (what runs where is template.py's and clone.py's job), so it is unit-tested.
"""

from __future__ import annotations

import shlex

AGENT_UNIT = "flightctl-agent.service"
CLONE_MARKER = "/var/lib/fcdev-clone"  # written into each clone; a revert that took removes it
REVERT_DID_NOT_TAKE = 97  # the identity script's exit code when the marker is still there
ENTROPY_BYTES = 512
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): force the kernel CRNG to reseed from its pool
# cloud-init must not put the template's hostname back on a clone's reboot (update_hostname and
# update_etc_hosts run on every boot and read the template's user-data).
CLOUD_CFG = "/etc/cloud/cloud.cfg.d/99-fcdev-clone.cfg"
CLOUD_CFG_TEXT = "preserve_hostname: true\nmanage_etc_hosts: false\n"


HOLD_DROPIN = f"/run/systemd/system/{AGENT_UNIT}.d/fcdev-hold.conf"
RELEASE_FILE = "/run/fcdev-agent-release"  # a clone creates it: the held agent goes on starting
HOLD_DROPIN_TEXT = ("[Service]\n"
                    f"ExecStartPre=/bin/sh -c 'while [ ! -e {RELEASE_FILE} ]; do sleep 0.2; done'\n"
                    "TimeoutStartSec=infinity\n")


def hold_agent_bootcmd() -> str:
    """The template's bootcmd (cloud-init's earliest user-data hook, before write_files writes the
    agent's config): a runtime drop-in that makes the agent's start wait for RELEASE_FILE.

    A drop-in, not a mask: a runtime mask does not hide a unit file in /etc/systemd/system (which
    outranks /run), while drop-ins from every directory apply. A wait in ExecStartPre, not a
    Condition: a unit started by a .path unit would be re-triggered in a loop by a failed
    condition, and a waiting start holds either wiring (WantedBy=multi-user.target, or a .path
    unit) with no main process, no key and no request until a clone releases it. The drop-in
    lives in /run: a clone's reboot starts the agent as usual. No systemd (the tiny test guest):
    nothing to hold.
    """
    return ("if command -v systemctl >/dev/null 2>&1; then "
            f"mkdir -p {shlex.quote(HOLD_DROPIN.rsplit('/', 1)[0])} && "
            f"printf %s {shlex.quote(HOLD_DROPIN_TEXT)} > {HOLD_DROPIN} && systemctl daemon-reload; fi")


def agent_held_check() -> str:
    """Exit 0 when the agent's main process has not run in this guest: the hold is in effect and
    the unit has no main PID (it waits in the hold, or was never started)."""
    return ("! command -v systemctl >/dev/null 2>&1 || "
            f"{{ [ ! -e {RELEASE_FILE} ] && systemctl show -p DropInPaths --value {AGENT_UNIT} | grep -q fcdev-hold "
            f"&& [ \"$(systemctl show -p MainPID --value {AGENT_UNIT})\" = 0 ]; }}")


def identity_script(*, hostname: str, epoch: float) -> str:
    """The clone's identity, as one `sudo sh -c` script; the host's entropy comes on stdin.

    `epoch` is the host's time.time() when the command is sent. The clock is set first, to the
    millisecond where date takes it (GNU; busybox takes whole seconds): set later, it would be as
    old as the steps before it took (python3 alone takes 1-2 s on a loaded TCG guest).
    Exit REVERT_DID_NOT_TAKE when the previous clone's marker survived the revert.
    """
    name = shlex.quote(hostname)
    lines = [
        "set -eu",
        f"date -u -s @{epoch:.3f} >/dev/null 2>&1 || date -u -s @{round(epoch)} >/dev/null",
        f"if [ -e {CLONE_MARKER} ]; then echo \"the revert did not take: $(cat {CLONE_MARKER}) is still "
        f"there\" >&2; exit {REVERT_DID_NOT_TAKE}; fi",
        # entropy: stdin into the pool, then a forced CRNG reseed where python3 can issue the ioctl
        f"head -c {ENTROPY_BYTES} > /dev/urandom",
        "if command -v python3 >/dev/null 2>&1; then python3 -c 'import fcntl, os; "
        f"fcntl.ioctl(os.open(\"/dev/urandom\", os.O_WRONLY), {RNDRESEEDCRNG})'; fi",
        "if [ -f /etc/machine-id ]; then "
        "od -An -tx1 -N16 /dev/urandom | tr -d ' \\n' > /etc/machine-id.new && echo >> /etc/machine-id.new && "
        "mv /etc/machine-id.new /etc/machine-id; fi",
        "old=$(hostname)",
        f"hostname {name}",
        f"echo {name} > /etc/hostname",
        f"if [ -f /etc/hosts ]; then sed -i \"s/\\b$old\\b/\"{name}\"/g\" /etc/hosts; fi",
        f"if [ -d /etc/cloud/cloud.cfg.d ]; then printf {shlex.quote(CLOUD_CFG_TEXT)} > {CLOUD_CFG}; fi",
        f"echo {name} > {CLONE_MARKER}",
        "sync",
        # the agent last: its key and device name come from the reseeded pool
        f"touch {RELEASE_FILE}",
        "if command -v systemctl >/dev/null 2>&1 && systemctl cat "
        f"{AGENT_UNIT} >/dev/null 2>&1; then systemctl start --no-block {AGENT_UNIT}; fi",
    ]
    return "sudo sh -c " + shlex.quote("\n".join(lines))
