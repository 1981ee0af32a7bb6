"""`p2pvbd vm …`: define, start, stop, list and watch VMs (thin: the daemon does the work)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from p2pvbd.base.units import format_size
from p2pvbd.cli.common import ask, console, fail, print_json, rate_arg

# `vm console` looks for new serial output this often: a person reading a console sees no lag.
CONSOLE_POLL_SECONDS = 0.2


def cmd_vm_create(args: argparse.Namespace) -> None:
    kernel = str(Path(args.kernel).absolute()) if args.kernel else ""
    initrd = str(Path(args.initrd).absolute()) if args.initrd else ""
    info = ask(args, "vm_create", name=args.vm, disks=args.disk, memory=args.memory, cpus=args.cpus,
                    accel=args.accel, kernel=kernel, initrd=initrd, append=args.append or "",
                    qemu_args=args.qemu_arg or [], replace=args.replace)
    if args.json:
        print_json(info)
        return
    if args.replace:
        print_changed(info)
        return
    print(f"defined VM {info['name']}: disks {', '.join(info['disks'])}, {format_size(info['memory'])} of memory, "
          f"{info['cpus']} CPU(s); start it with 'p2pvbd vm start {info['name']}'")


def cmd_vm_set(args: argparse.Namespace) -> None:
    changes: dict[str, Any] = {k: v for k, v in (("memory", args.memory), ("cpus", args.cpus), ("accel", args.accel),
                                                  ("append", args.append), ("disks", args.disk),
                                                  ("qemu_args", args.qemu_arg)) if v is not None}
    for what in ("kernel", "initrd"):  # "" clears it; a path is this host's, made absolute
        if (path := getattr(args, what)) is not None:
            changes[what] = str(Path(path).absolute()) if path else ""
    if not changes:
        fail("say what changes: --memory, --cpus, --accel, --kernel, --initrd, --append, --disk or --qemu-arg")
    info = ask(args, "vm_set", name=args.vm, changes=changes)
    if args.json:
        print_json(info)
        return
    print_changed(info)


def print_changed(info: dict[str, Any]) -> None:
    """What `vm set` or `vm create --replace` changed, and what that means for where the VM runs."""
    name = info["name"]
    if not info["changed"]:
        print(f"VM {name} unchanged")
        return
    line = f"VM {name} changed: {', '.join(info['changed'])}"
    if info["restart_needed"]:
        line += f"; it runs on {info['host']} with the old definition until its next start"
    else:
        line += "; it takes effect at its next start"
    if info["approve_again"]:
        line += (f"; hosts that approved it must approve it again ('p2pvbd vm approve {name}' there) before "
                 "it runs or moves there")
    print(line)


def cmd_vm_delete(args: argparse.Namespace) -> None:
    info = ask(args, "vm_delete", name=args.vm)
    if args.json:
        print_json(info)
        return
    print(f"deleted VM {info['name']} on every host; its disks stay ({', '.join(info['disks'])}: "
          "'p2pvbd disk delete DISK' deletes one)")


def cmd_vm_start(args: argparse.Namespace) -> None:
    info = ask(args, "vm_start", name=args.vm)
    if args.json:
        print_json(info)
        return
    print(f"VM {info['name']} {info['state']} on {info['host']} ({info['accel']}); serial log: {info['serial']}")


def cmd_vm_approve(args: argparse.Namespace) -> None:
    info = ask(args, "vm_approve", name=args.vm)
    if args.json:
        print_json(info)
        return
    parts = {k: v for k, v in info["host_parts"].items() if v}
    shown = "; ".join(f"{k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in parts.items())
    print(f"VM {info['name']} may run here" + (f" with {shown}" if shown else " (it uses nothing of this host)"))


def cmd_vm_allow(args: argparse.Namespace) -> None:
    if args.none == bool(args.hosts):
        fail("name the hosts that may pull the VM (HOST[,HOST…]), or --none")
    hosts = [] if args.none else [h for h in args.hosts.split(",") if h]
    info = ask(args, "vm_allow", name=args.vm, hosts=hosts)
    if args.json:
        print_json(info)
        return
    print(f"VM {info['name']} may be pulled to " + (", ".join(info["allow"]) or "no host: only its owner moves it"))


def cmd_vm_stop(args: argparse.Namespace) -> None:
    info = ask(args, "vm_stop", name=args.vm, grace=args.timeout)
    if args.json:
        print_json(info)
        return
    if info["shut_down"]:
        print(f"VM {info['name']} shut down")
    elif args.timeout > 0:
        print(f"VM {info['name']} stopped: QEMU quit after {args.timeout:g} s without the guest powering off")
    else:
        print(f"VM {info['name']} stopped (QEMU quit at once)")


def cmd_vm_list(args: argparse.Namespace) -> None:
    vms = ask(args, "vm_list")
    if args.json:
        print_json(vms)
        return
    from rich.table import Table

    table = Table("vm", "host", "state", "disks", "memory", "may pull", "serial log", box=None)
    for v in vms:
        table.add_row(v["name"], v["host"] or "-", v["state"], ", ".join(v["disks"]), format_size(v["memory"]),
                      ", ".join(v["allow"]) or "-", v["serial"])
    console().print(table)


def cmd_vm_console(args: argparse.Namespace) -> None:
    """Print the VM's serial log and follow it, as `tail -f` would, until interrupted."""
    vm = next((v for v in ask(args, "vm_list") if v["name"] == args.vm), None)
    if vm is None:
        fail(f"no VM named {args.vm!r} (see 'p2pvbd vm list')")
    path = Path(vm["serial"])
    if not path.exists():
        fail(f"VM {args.vm} has not run on this host: no serial log at {path}"
                  + (f" (it runs on {vm['host']})" if vm["host"] else ""))
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                elif not args.follow:
                    return
                else:
                    time.sleep(CONSOLE_POLL_SECONDS)
    except KeyboardInterrupt:
        pass


def cmd_vm_replicate(args: argparse.Namespace) -> None:
    on = [h for h in (args.on or "").split(",") if h]
    off = [h for h in (args.off or "").split(",") if h]
    if not on and not off and args.rate is None:
        fail("say which hosts: --on HOST[,HOST…] or --off HOST[,HOST…]")
    policy = ask(args, "vm_replicate", name=args.vm, on=on, off=off, rate=args.rate)
    if args.json:
        print_json(policy)
        return
    hosts = ", ".join(policy["hosts"]) or "no host"
    print(f"VM {policy['vm']}: memory and disks kept warm on {hosts}; at most {format_size(policy['rate'])}/s each")


def print_vm_move(args: argparse.Namespace, r: dict[str, Any]) -> None:
    """`migrate VM`'s outcome: the VM's pause and memory, then one line per disk."""
    disk_keys = ("disk", "from", "to", "mode", "duration_s", "downtime_ms", "switchover_ms", "bytes_on_wire",
                 "bytes_from", "epoch", "error")
    if args.json:
        print_json({"vm": r["vm"], "from": r["from"], "to": r["to"], "mode": r["mode"],
                         "duration_s": r["duration_s"], "vm_downtime_ms": r["vm_downtime_ms"],
                         "disk_switchover_ms": r["disk_switchover_ms"], "ram_bytes": r["ram_bytes"],
                         "ram_wire_bytes": r["ram_wire_bytes"], "ram_pages": r.get("ram_pages", 0),
                         "ram_by_ref": r.get("ram_by_ref", {}), "ram_missed_pages": r.get("ram_missed_pages", 0),
                         "ram_from_peers": r.get("ram_from_peers", {}), "ram_passes": r.get("ram_passes", 0),
                         "ram_downtime_limit_ms": r.get("ram_downtime_limit_ms"),
                         "ram_throttle_percent": r.get("ram_throttle_percent", 0),
                         "error": r["error"], "disks": [{k: d[k] for k in disk_keys} for d in r["disks"]]})
    if r["error"]:
        print(f"p2pvbd: error: VM {r['vm']}: {r['error']}", file=sys.stderr)
        raise SystemExit(1)
    if not args.json:
        paused = f"{r['vm_downtime_ms']:.0f} ms" if r["vm_downtime_ms"] is not None else "(QEMU did not say how long)"
        print(f"VM {r['vm']} now runs on {r['to']} after {r['duration_s']:.1f} s; paused {paused}; "
              f"{format_size(r['ram_bytes'])} of memory moved "
              f"({format_size(r['ram_wire_bytes'])} on the wire)")
        for d in r["disks"]:
            print(f"  {d['disk']}: owned by {d['to']} (epoch {d['epoch']}), "
                  f"{format_size(d['bytes_on_wire'])} moved")


def add_parsers(add: Any, as_json: argparse.ArgumentParser) -> None:
    vm = add("vm", None, "define, start, stop and list virtual machines (QEMU) on p2pvbd disks")
    vsub = vm.add_subparsers(dest="vm_command", required=True, metavar="SUBCOMMAND")
    sp = add("create", cmd_vm_create, "define a VM on disks this host owns; any host can then run it",
             (as_json,), into=vsub)
    sp.add_argument("vm")
    sp.add_argument("--disk", required=True, metavar="DISK[,DISK…]", help="its disks, the first one booted from")
    sp.add_argument("--memory", default="1G", help="e.g. 512M or 2G (default 1G)")
    sp.add_argument("--cpus", type=int, default=1)
    sp.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                    help="auto (default): KVM if it runs guests on the host, else TCG emulation")
    sp.add_argument("--kernel", metavar="FILE", help="boot this kernel directly instead of the first disk")
    sp.add_argument("--initrd", metavar="FILE")
    sp.add_argument("--append", metavar="TEXT", help="the kernel's command line")
    sp.add_argument("--qemu-arg", action="append", metavar="ARG", help="one more QEMU argument (repeatable)")
    sp.add_argument("--replace", action="store_true", help="define an existing VM anew (who may pull it stays)")
    sp = add("set", cmd_vm_set, "change some of a VM's definition (run on the owner of its disks); a running VM "
             "gets the change at its next start", (as_json,), into=vsub)
    sp.add_argument("vm")
    sp.add_argument("--disk", metavar="DISK[,DISK…]", help="its disks, the first one booted from")
    sp.add_argument("--memory", help="e.g. 512M or 2G")
    sp.add_argument("--cpus", type=int)
    sp.add_argument("--accel", choices=("auto", "kvm", "tcg"))
    sp.add_argument("--kernel", metavar="FILE", help="boot this kernel directly ('' boots the first disk again)")
    sp.add_argument("--initrd", metavar="FILE", help="('' for none)")
    sp.add_argument("--append", metavar="TEXT", help="the kernel's command line")
    sp.add_argument("--qemu-arg", action="append", metavar="ARG",
                    help="the extra QEMU arguments, replacing the old ones (repeatable)")
    sp = add("delete", cmd_vm_delete, "delete a VM that runs nowhere: its definition on every host and this "
             "host's files of it (serial log, memory image); its disks stay", (as_json,), into=vsub)
    sp.add_argument("vm")
    sp = add("start", cmd_vm_start, "start a VM on this host (it must own the VM's disks)", (as_json,), into=vsub)
    sp.add_argument("vm")
    sp = add("approve", cmd_vm_approve, "let this host run a VM defined on another host, with the kernel, initrd "
             "and QEMU arguments it names (they run as root here)", (as_json,), into=vsub)
    sp.add_argument("vm")
    sp = add("allow", cmd_vm_allow, "name the hosts that may pull a VM to themselves ('migrate VM --to HOST' run "
             "there); run on the owner of its disks", (as_json,), into=vsub)
    sp.add_argument("vm")
    sp.add_argument("hosts", nargs="?", metavar="HOST[,HOST…]")
    sp.add_argument("--none", action="store_true", help="no host may: only the owner moves the VM")
    sp = add("stop", cmd_vm_stop, "power a VM off (ACPI), quitting QEMU after --timeout", (as_json,), into=vsub)
    sp.add_argument("vm")
    sp.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="how long the guest may take to power off (default 30; 0 quits at once)")
    add("list", cmd_vm_list, "the VMs this host runs or knows of", (as_json,), into=vsub)
    sp = add("replicate", cmd_vm_replicate, "keep a running VM's memory and disks warm on other hosts, so a "
             "move there sends only what changed (run where the VM runs)", (as_json,), into=vsub)
    sp.add_argument("vm")
    sp.add_argument("--on", metavar="HOST,…", help="hosts that keep a warm copy")
    sp.add_argument("--off", metavar="HOST,…", help="hosts that stop keeping one (their copy is deleted)")
    sp.add_argument("--rate", type=rate_arg, help="cap on this host's upload to each, e.g. 2M (bytes/s) or 20mbit")
    sp = add("console", cmd_vm_console, "print a VM's serial log on this host and follow it", into=vsub)
    sp.add_argument("vm")
    sp.add_argument("--no-follow", dest="follow", action="store_false", help="print what is there and exit")
