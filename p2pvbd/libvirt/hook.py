"""libvirt's qemu hook (/etc/libvirt/hooks/qemu): libvirtd runs it with ``DOMAIN OP SUBOP -`` and the
domain's XML on stdin. It asks this host's p2pvbd daemon, over its control socket:

- ``migrate begin`` (at the destination, before its QEMU starts): take the domain's p2pvbd disks in; the
  daemon returns once they converged and mirror, and the hook prints the XML with the disks on this
  host's socket. A failure (no daemon here, the owner refuses) exits non-zero: libvirt then refuses the
  migration and the domain runs on at its source.
- ``prepare begin``: a domain on p2pvbd disks starts only on the host that owns them (or is receiving
  them in a migration), so one defined on two hosts never runs on both.
- ``stopped end`` / ``release end``: the domain's QEMU here is gone. At a destination whose disks have not
  switched over, the arrival is called off; at a source, the daemon switches the disks over once libvirt
  says the domain runs at the destination.

The hook never calls libvirt itself (libvirtd waits for it: that would deadlock).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from p2pvbd.base.control import ControlError, DaemonNotRunning, call
from p2pvbd.base.home import Home, resolve_home
from p2pvbd.libvirt import domxml

# The destination's daemon answers `migrate begin` once the disks converged: the bulk copy of the disks
# from every holder. A day bounds a stuck daemon, not a big disk over a slow link.
INCOMING_SECONDS = 24 * 3600.0
# Telling the daemon a domain stopped: it answers at once (the work goes on in the background).
STOPPED_SECONDS = 10.0

HOOK_SCRIPT = """#!/bin/sh
# libvirt's qemu hook, installed by 'p2pvbd libvirt install-hook': moves the p2pvbd disks of a domain with it.
PYTHONPATH={pythonpath} exec {python} -m p2pvbd.libvirt.hook --home {home} "$@"
"""


def hook_script(home: Path) -> str:
    """The hook runs this Python, with this p2pvbd, for this home."""
    import p2pvbd

    pythonpath = Path(p2pvbd.__file__).resolve().parent.parent
    return HOOK_SCRIPT.format(pythonpath=_quote(str(pythonpath)), python=_quote(sys.executable),
                              home=_quote(str(home)))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def install(hooks_dir: Path, home: Path) -> Path:
    """Write the qemu hook; refuses to replace a hook that is not p2pvbd's."""
    path = hooks_dir / "qemu"
    if path.exists() and "p2pvbd" not in path.read_text(errors="replace"):
        raise ControlError(f"{path} is another program's hook: merge it by hand (see README, 'With libvirt')")
    hooks_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("qemu.p2pvbd-tmp")
    tmp.write_text(hook_script(home))
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def handle(home: Home, domain: str, op: str, subop: str, xml: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one hook call."""
    if (op, subop) == ("migrate", "begin"):
        return _migrate_begin(home, domain, xml)
    if (op, subop) == ("prepare", "begin"):
        return _prepare_begin(home, domain, xml)
    if (op, subop) in (("stopped", "end"), ("release", "end")):
        try:
            call(home.control_socket, "libvirt_stopped", {"domain": domain}, timeout=STOPPED_SECONDS)
        except ControlError:
            pass  # no daemon: nothing of this domain is moving here
    return 0, "", ""


def _prepare_begin(home: Home, domain: str, xml: str) -> tuple[int, str, str]:
    """Before QEMU starts here: a domain on p2pvbd disks starts only where they are owned (or arriving)."""
    try:
        nbd = domxml.nbd_disks(xml)
    except domxml.DomainXmlError:
        return 0, "", ""  # libvirt itself will say what is wrong with it
    if not nbd:
        return 0, "", ""
    try:
        call(home.control_socket, "libvirt_prepare",
             {"domain": domain, "disks": {t: name for t, (name, _) in nbd.items()}}, timeout=STOPPED_SECONDS)
    except DaemonNotRunning:
        return 1, "", f"p2pvbd: no p2pvbd daemon runs on this host (home {home.path}) to serve the disks of {domain}\n"
    except ControlError as e:
        return 1, "", f"p2pvbd: {domain} cannot start here: {e}\n"
    return 0, "", ""


def _migrate_begin(home: Home, domain: str, xml: str) -> tuple[int, str, str]:
    try:
        nbd = domxml.nbd_disks(xml)
    except domxml.DomainXmlError as e:
        return 1, "", f"p2pvbd: the incoming definition of {domain}: {e}\n"
    if not nbd:
        return 0, "", ""  # no NBD disk: not p2pvbd's domain (empty output keeps libvirt's XML)
    disks = {target: name for target, (name, _) in nbd.items()}
    try:
        reply = call(home.control_socket, "libvirt_incoming", {"domain": domain, "disks": disks},
                     timeout=INCOMING_SECONDS)
    except DaemonNotRunning:
        return 1, "", (f"p2pvbd: no p2pvbd daemon runs on this host (home {home.path}): the disks of {domain} "
                       "cannot follow it here; migration refused\n")
    except ControlError as e:
        return 1, "", f"p2pvbd: {domain} cannot move here: {e}\n"
    if not reply["disks"]:
        return 0, "", ""
    return 0, domxml.point_at(xml, set(reply["disks"]), reply["socket"]), ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="p2pvbd-libvirt-hook")
    p.add_argument("--home")
    p.add_argument("domain")
    p.add_argument("op")
    p.add_argument("subop")
    p.add_argument("extra", nargs="*")
    args = p.parse_args(argv)
    xml = sys.stdin.read()
    status, out, err = handle(Home(resolve_home(args.home)), args.domain, args.op, args.subop, xml)
    sys.stdout.write(out)
    sys.stderr.write(err)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
