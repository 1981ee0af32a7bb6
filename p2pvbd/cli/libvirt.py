"""`p2pvbd libvirt adopt|list|install-hook` and `p2pvbd install-service` (thin: argument parsing and printing)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from p2pvbd.base.control import ControlError
from p2pvbd.cli.common import ask, fail, home_of, print_json
from p2pvbd.libvirt import book, hook
from p2pvbd.libvirt.adopt import AdoptError, adopt
from p2pvbd.libvirt.virsh import SYSTEM_URI, Virsh

# Where libvirt looks for its qemu hook, and systemd for units an administrator adds.
LIBVIRT_HOOKS_DIR = Path("/etc/libvirt/hooks")
SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "p2pvbd.service"


def cmd_adopt(args: argparse.Namespace) -> None:
    home = home_of(args)
    home.load_config()
    try:
        info = adopt(home, args.domain, Virsh(args.connect), delete_images=args.delete_images)
    except AdoptError as e:
        fail(str(e))
    if args.json:
        print_json(info)
        return
    disks = ", ".join(f"{t} -> {d}" for t, d in sorted(info["disks"].items()))
    kept = f"; the original images are kept ({', '.join(info['images'].values())})" if info["images"] else ""
    print(f"adopted {info['domain']}: {disks}, served on {info['socket']}{kept}")


def cmd_list(args: argparse.Namespace) -> None:
    domains = ask(args, "libvirt_list")
    if args.json:
        print_json(domains)
        return
    if not domains:
        print("no adopted domain (adopt one with 'p2pvbd libvirt adopt DOMAIN')")
    for d in domains:
        disks = ", ".join(f"{t}: {n} (owner {d['owners'].get(n) or '?'})" for t, n in sorted(d["disks"].items()))
        print(f"{d['domain']}: {d['state']} here; {disks}")


def cmd_install_hook(args: argparse.Namespace) -> None:
    home = home_of(args)
    home.load_config()
    book.save_config(home.path, book.LibvirtConfig(uri=args.connect, peer_uri=args.peer_uri or "",
                                                   migrate_uri=args.migrate_uri or ""))
    try:
        path = hook.install(Path(args.hooks_dir), home.path)
    except (OSError, ControlError) as e:
        fail(f"cannot install the hook: {e}")
    print(f"installed libvirt's qemu hook {path}; restart libvirtd (or virtqemud) so that it uses it")


def unit_text(binary: str, home: Path) -> str:
    """The packaged unit with this host's p2pvbd and home."""
    text = resources.files("p2pvbd.data").joinpath(UNIT_NAME).read_text()
    return (text.replace("/usr/bin/p2pvbd", binary).replace("--home /var/lib/p2pvbd", f"--home {home}"))


def cmd_install_service(args: argparse.Namespace) -> None:
    home = home_of(args)
    home.load_config()
    binary = shutil.which("p2pvbd") or str(Path(sys.executable).parent / "p2pvbd")
    unit_dir = Path(args.unit_dir)
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        (unit_dir / UNIT_NAME).write_text(unit_text(binary, home.path.resolve()))
    except OSError as e:
        fail(f"cannot write {unit_dir / UNIT_NAME}: {e.strerror}")
    print(f"installed {unit_dir / UNIT_NAME}")
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl") and unit_dir == SYSTEMD_UNIT_DIR:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        print("start it with: systemctl enable --now p2pvbd (stop a daemon started by hand first: p2pvbd stop)")
    else:
        print("systemd does not run here: load it with 'systemctl daemon-reload' once it does")


def add_parsers(add: Any, as_json: argparse.ArgumentParser) -> None:
    lv = add("libvirt", None, "libvirt domains on p2pvbd disks: adopt them; virsh and virt-manager then move "
             "their disks with them")
    lsub = lv.add_subparsers(dest="libvirt_command", required=True, metavar="SUBCOMMAND")
    sp = add("adopt", cmd_adopt, "import a shut-off domain's disk images as p2pvbd disks owned by this host and "
             "redefine the domain on them", (as_json,), into=lsub)
    sp.add_argument("domain")
    sp.add_argument("--connect", "-c", default=SYSTEM_URI, metavar="URI", help=f"libvirt's URI (default {SYSTEM_URI})")
    sp.add_argument("--delete-images", action="store_true", help="delete the original images once imported")
    add("list", cmd_list, "the adopted domains known here, their state and disks", (as_json,), into=lsub)
    sp = add("install-hook", cmd_install_hook, "install libvirt's qemu hook, which moves an adopted domain's disks "
             "whenever libvirt migrates it", into=lsub)
    sp.add_argument("--hooks-dir", default=str(LIBVIRT_HOOKS_DIR), metavar="DIR",
                    help=f"libvirt's hook directory (default {LIBVIRT_HOOKS_DIR})")
    sp.add_argument("--connect", "-c", default=SYSTEM_URI, metavar="URI",
                    help=f"how this host's daemon reaches libvirt here (default {SYSTEM_URI})")
    sp.add_argument("--peer-uri", metavar="URI", help="how other hosts' libvirt reaches this one, for "
                    "'p2pvbd migrate DOMAIN --to THIS-HOST' (default qemu+ssh://HOST/system)")
    sp.add_argument("--migrate-uri", metavar="URI", help="QEMU's migration address here (virsh --migrateuri), "
                    "when this host's name does not resolve to it")
    sp = add("install-service", cmd_install_service, "install p2pvbd.service, the daemon as a systemd service "
             "for this home")
    sp.add_argument("--unit-dir", default=str(SYSTEMD_UNIT_DIR), metavar="DIR",
                    help=f"where the unit goes (default {SYSTEMD_UNIT_DIR})")
