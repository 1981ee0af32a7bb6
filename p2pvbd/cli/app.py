"""The ``p2pvbd`` command: parse arguments, ask the daemon, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

from p2pvbd import __version__
from p2pvbd.base.control import ControlError
from p2pvbd.base.home import (
    Config,
    HomeError,
    is_ip,
    is_loopback,
    parse_hostport,
    parse_nbd_tcp,
    wait_for_daemon_exit,
)
from p2pvbd.base.listen_check import check_listen
from p2pvbd.base.units import SIZE_RULE, format_size
from p2pvbd.cli.attach import AttachError, attach, detach
from p2pvbd.cli.common import ask, console, fail, home_of, print_json, setup_daemon_logging
from p2pvbd.cli.common import rate_arg as _rate
from p2pvbd.cli.common import size_arg as _size
from p2pvbd.store.capacity import capacity_warnings

# How often `sync` and `migrate` redraw their progress from the daemon.
JOB_POLL_SECONDS = 0.2
# Stopping flushes and checkpoints every disk; a large journal may take a while to write out.
STOP_WAIT_SECONDS = 60.0
LISTEN_FIX = "choose another with --listen HOST:PORT"
NBD_TCP_HELP = ("also serve NBD over TLS on this TCP address (an IP address or localhost; port 10809 if omitted); "
                "clients need a certificate from 'p2pvbd nbd-client-cert'")


def _duration(text: str) -> int:
    m = re.match(r"^(\d+)([smhd]?)$", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (expected e.g. 90s, 30m, 1h, 2d)")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# ---- commands --------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> None:
    from p2pvbd.swarm import trust

    home = home_of(args)
    home.check_new(args.name, listen=args.listen, nbd_tcp=args.nbd_tcp or "")
    check_listen(args.listen or Config.listen, LISTEN_FIX)
    cfg = home.init(args.name, listen=args.listen, nbd_tcp=args.nbd_tcp or "")
    identity = trust.create_swarm(home.path, cfg.name)
    print(f"initialised host {cfg.name} in {home.path}: a new swarm (CA {identity.ca_fingerprint[:16]}…); "
          f"{_listening(cfg.listen)}")
    _print_nbd_tcp(cfg.nbd_tcp)


def _listening(listen: str) -> str:
    """Say where peers connect and what guards it: a new user should not have to read the config to know."""
    host, _ = parse_hostport(listen)
    who = "this machine only" if host and is_ip(host) and is_loopback(host) else "members only"
    return f"listening on {listen} (TLS, {who})"


def _print_nbd_tcp(nbd_tcp: str) -> None:
    """Say what --nbd-tcp opens, and to whom."""
    if not nbd_tcp:
        return
    host, port = parse_nbd_tcp(nbd_tcp)
    print(f"NBD over TLS on {host}:{port}: clients need a certificate from 'p2pvbd nbd-client-cert DIR'")
    if not is_loopback(host):
        print(f"note: {host}:{port} is reachable from the network, not only from this machine")


def cmd_join(args: argparse.Namespace) -> None:
    import trio

    from p2pvbd.swarm import invites, trust
    from p2pvbd.swarm.peer_transport import join_swarm

    home = home_of(args)
    if home.is_initialised():
        fail(f"{home.path} is already initialised as host {home.load_config().name!r}")
    try:
        invite = invites.parse_invite(args.token)
        home.check_new(args.name, listen=args.listen, nbd_tcp=args.nbd_tcp or "")
        check_listen(args.listen or Config.listen, LISTEN_FIX)  # before the token is spent
        identity = trio.run(partial(join_swarm, home.path, args.token, args.name))
    except trust.TrustError as e:
        fail(str(e))
    cfg = home.init(args.name, listen=args.listen, nbd_tcp=args.nbd_tcp or "", bootstrap=invite.addresses)
    print(f"host {identity.name} joined the swarm (CA {identity.ca_fingerprint[:16]}…) in {home.path}; "
          f"{_listening(cfg.listen)}")
    _print_nbd_tcp(cfg.nbd_tcp)


def cmd_invite(args: argparse.Namespace) -> None:
    res = ask(args, "invite", ttl=args.ttl)
    if args.json:
        print_json(res)
    else:
        print(res["token"])


def cmd_revoke(args: argparse.Namespace) -> None:
    res = ask(args, "revoke", host=args.host)
    if args.json:
        print_json(res)
        return
    told = ", ".join(res["told"]) or "no host reachable now"
    print(f"revoked: {', '.join(res['revoked'])} (list {res['serial']}); told {told}; the index carries it "
          "to the others")


def cmd_peers(args: argparse.Namespace) -> None:
    peers = ask(args, "peers")
    if args.json:
        print_json(peers)
        return
    from rich.table import Table

    table = Table("host", "addresses", "last seen", "reachable", "last pull rate", box=None)
    paths = {"outbound": "yes", "inbound": "yes, over its link to here", "punched": "yes, punched through NAT"}
    for p in peers:
        path = paths.get(p["path"], f"yes, {p['path']}" if p["path"] else "yes")
        reach = path if p["reachable"] else f"no ({p['error']})" if p["error"] else "no"
        seen = "never" if p["last_seen_ago_s"] is None else f"{p['last_seen_ago_s']:.0f} s ago"
        rate = "" if p.get("pull_rate") is None else f"{format_size(p['pull_rate'])}/s"
        where = ", ".join(p["addresses"])
        if p.get("reach") == "nat":
            where += f" (behind NAT, seen as {', '.join(p['seen_as'])})"
        table.add_row(p["name"], where, seen, reach, rate)
    console().print(table)


def cmd_daemon(args: argparse.Namespace) -> None:
    from p2pvbd.daemon import run_daemon  # trio is only imported where it runs
    from p2pvbd.migration.failpoints import FailpointError
    from p2pvbd.swarm.trust import TrustError

    setup_daemon_logging(args.log_file, args.verbose)
    log = logging.getLogger("p2pvbd.daemon")
    try:
        run_daemon(home_of(args), **({} if args.vm_timeout is None else {"vm_timeout": args.vm_timeout}))
    except (FailpointError, TrustError, HomeError) as e:
        if args.log_file:  # where a service's user looks; on a terminal the line below says it
            log.error("cannot run the daemon: %s", e)
        fail(str(e))
    except Exception as e:
        # the traceback goes to the log file (or, with -v, to the terminal), the terminal gets one line
        if args.log_file or args.verbose:
            log.error("the daemon stopped on an unexpected error", exc_info=True)
        fail(f"the daemon stopped on an unexpected error: {e!r}"
             + (f" (details in {args.log_file})" if args.log_file else ""))


def cmd_nbd_client_cert(args: argparse.Namespace) -> None:
    from p2pvbd.nbd import tls as nbd_tls
    from p2pvbd.swarm.trust import TrustError

    home = home_of(args)
    cfg = home.load_config()
    name = args.name or nbd_tls.DEFAULT_CLIENT_NAME
    try:
        out = nbd_tls.write_client_credentials(home.path, cfg.name, Path(args.dir), name)
    except TrustError as e:
        fail(str(e))
    print(f"wrote NBD client credentials {name!r} to {out}: {nbd_tls.CA_CERT_FILE}, "
          f"{nbd_tls.CLIENT_CERT_FILE}, {nbd_tls.CLIENT_KEY_FILE} (keep the key private)")
    if not cfg.nbd_tcp:
        print(f"host {cfg.name} serves NBD on its Unix socket only: set nbd_tcp in {home.config_path} and restart "
              "the daemon to serve it over TCP")
        return
    host, port = parse_nbd_tcp(cfg.nbd_tcp)
    host = "127.0.0.1" if host in ("0.0.0.0", "localhost") else "::1" if host == "::" else host
    addr = f"[{host}]" if ":" in host else host
    print(f"nbdinfo 'nbds://{addr}:{port}/DISK?tls-certificates={out}'")
    print(f"qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir={out} --image-opts "
          f"driver=nbd,server.type=inet,server.host={host},server.port={port},export=DISK,tls-creds=tls0")


def cmd_stop(args: argparse.Namespace) -> None:
    outcome = ask(args, "shutdown", **({} if args.vm_timeout is None else {"vm_timeout": args.vm_timeout}))
    home = home_of(args)
    if not wait_for_daemon_exit(home, STOP_WAIT_SECONDS):
        fail(f"the daemon of {home.path} did not stop within {STOP_WAIT_SECONDS:.0f} s")
    for name in outcome["shut_down"]:
        print(f"VM {name} shut down")
    for name in outcome["killed"]:
        print(f"VM {name} killed: it did not power off within {outcome['vm_timeout']:g} s")
    print("daemon stopped")


def cmd_disk_create(args: argparse.Namespace) -> None:
    info = ask(args, "disk_create", name=args.disk, size=args.size, block_size=args.block_size)
    print(f"created disk {info['name']}: {format_size(info['size'])}, blocks of {format_size(info['block_size'])}")
    fs = os.statvfs(home_of(args).disks_dir)
    for warning in capacity_warnings(info["size"], info["block_size"], fs.f_bavail * fs.f_frsize, _available_memory()):
        print(f"p2pvbd: warning: {warning}", file=sys.stderr)


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo (what can be had without swapping), None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cmd_disk_import(args: argparse.Namespace) -> None:
    path = Path(args.file).absolute()
    if not path.is_file():
        fail(f"{args.file} is not a file")
    info = ask(args, "disk_import", name=args.disk, path=str(path), block_size=args.block_size)
    print(f"imported {args.file} as disk {info['name']}: {format_size(info['size'])}, "
          f"{format_size(info['bytes_written'])} of data")


def cmd_disk_delete(args: argparse.Namespace) -> None:
    info = ask(args, "disk_delete", disk=args.disk, force=args.force)
    if args.json:
        print_json(info)
        return
    print(f"deleted this host's replica of {info['disk']} ({format_size(info['bytes_freed'])} freed); peers no "
          "longer ask this host for it")
    if info["vm"]:
        print(f"note: VM {info['vm']} still names {info['disk']}; 'p2pvbd vm delete {info['vm']}' deletes it")


def cmd_disk_list(args: argparse.Namespace) -> None:
    disks = ask(args, "disk_list")
    if args.json:
        print_json(disks)
        return
    from rich.table import Table

    table = Table("disk", "size", "block size", "owner", "epoch", "mode", box=None)
    for d in disks:
        table.add_row(d["name"], format_size(d["size"]), format_size(d["block_size"]), d["owner"],
                      str(d["epoch"]), d["mode"])
    console().print(table)


def cmd_disk_claim(args: argparse.Namespace) -> None:
    res = ask(args, "disk_claim", disk=args.disk)
    if args.json:
        print_json(res)
        return
    print(f"{res['owner']} owns {res['disk']} now (epoch {res['epoch']}), from its replica: "
          f"{res['held_blocks']} of {res['total_blocks']} blocks held")


def cmd_nbd_uri(args: argparse.Namespace) -> None:
    print(ask(args, "nbd_uri", disk=args.disk))


def cmd_status(args: argparse.Namespace) -> None:
    status = ask(args, "status", disk=args.disk)
    if args.json:
        print_json(status)
        return
    from rich.table import Table

    table = Table("disk", "size", "owner", "epoch", "replica on", "coverage", "current blocks", "lag", "warm",
                  title=f"p2pvbd status (host {status['host']})", box=None)
    notes = []
    for d in status["disks"]:
        warm = set((d.get("replicate") or {}).get("hosts", []))
        for i, r in enumerate(d["replicas"] or [None]):
            owner = d["owner"] if d.get("owner_reachable", True) else f"{d['owner']} (unreachable)"
            head = [d["name"], format_size(d["size"]), owner, str(d["epoch"])] if i == 0 else [""] * 4
            tail = [r["host"], f"{r['coverage']:.1%}" + (" (last known)" if r.get("stale") else ""),
                    f"{r['current_blocks']}/{r['total_blocks']}", f"{r['lag_blocks']} blocks",
                    "yes" if r["host"] in warm else ""] if r else ["-"] * 5
            table.add_row(*head, *tail)
        if not d.get("owner_reachable", True):
            notes.append(f"{d['name']}: owner {d['owner']} unreachable ({d['owner_error']}): coverage as last "
                         "measured against it")
        if (m := d.get("migration")) is not None:
            notes.append(f"{d['name']}: migrating from {m['from']} to {m['to']} ({m['mode']}): {m['phase']}, "
                         f"{format_size(m['done_bytes'])} of {format_size(m['total_bytes'])} pulled, "
                         f"mirror lag {m['mirror_lag_blocks']} blocks")
        for c in d.get("conflicts", []):
            notes.append(f"{d['name']}: conflict: {c['host']} claims to own it at epoch {c['epoch']}, not followed: "
                         f"{c['error']}")
        if d.get("replicate") and (rate := d["replicate"]["rate"]) > 0:
            notes.append(f"{d['name']}: owner upload for warm replicas at most {format_size(rate)}/s")
    console().print(table)
    for note in notes:
        print(note)


def cmd_sync(args: argparse.Namespace) -> None:
    sources = [h for h in (args.sources or "").split(",") if h] or None
    reply, interrupted = _start(args, "sync", disk=args.disk, sources=sources)
    res = _follow_jobs(args, [reply["job"]], f"sync {args.disk}", quiet=args.json, interrupted=interrupted)[0]
    if args.json:
        print_json({k: res[k] for k in ("disk", "bytes_from", "blocks_fetched", "bytes_on_wire", "map_bytes",
                                         "duration_s", "zero_blocks", "local_copies", "peers", "error")})
    elif not res["error"]:
        print(f"{args.disk}: {res['blocks_fetched']} blocks fetched ({format_size(res['bytes_on_wire'])} on the "
              f"wire) in {res['duration_s']:.1f} s from " + ", ".join(
                  f"{h} {format_size(b)}" for h, b in sorted(res["bytes_from"].items())))
        for host, p in sorted(res["peers"].items()):
            if p["dropped"] or p["bad_blocks"]:
                print(f"  {host}: {p['bad_blocks']} bad block(s){', dropped: ' + p['error'] if p['dropped'] else ''}")
    if res["error"]:
        fail(res["error"])


def cmd_migrate(args: argparse.Namespace) -> None:
    reply, interrupted = _start(args, "migrate", to=args.to, disks=args.disks or None, mode=args.mode,
                                max_downtime_ms=args.max_downtime)
    jobs = reply["jobs"]
    results = _follow_jobs(args, jobs, f"migrate to {args.to}", quiet=args.json, interrupted=interrupted)
    if "vm" in reply:
        from p2pvbd.cli.vm import print_vm_move

        print_vm_move(args, results[0])
        return
    keys = ("disk", "from", "to", "mode", "duration_s", "downtime_ms", "switchover_ms", "switchover_blocks",
            "bytes_on_wire", "map_bytes", "bytes_from", "epoch", "throttled", "error")
    if args.json:
        summary = [{k: r[k] for k in keys} for r in results]
        print_json(summary[0] if len(summary) == 1 else summary)
    for r in results:
        if r["error"]:
            print(f"p2pvbd: error: {r['disk']}: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{r['disk']}: now owned by {r['to']} (epoch {r['epoch']}) after {r['duration_s']:.1f} s; "
                  f"guest stalled {r['downtime_ms']:.0f} ms; {format_size(r['bytes_on_wire'])} moved from "
                  + ", ".join(f"{h} {format_size(b)}" for h, b in sorted(r["bytes_from"].items())))
    if any(r["error"] for r in results):
        raise SystemExit(1)


def cmd_replicate(args: argparse.Namespace) -> None:
    on = [h for h in (args.on or "").split(",") if h]
    off = [h for h in (args.off or "").split(",") if h]
    if not on and not off and args.rate is None:
        fail("say which hosts: --on HOST[,HOST…] or --off HOST[,HOST…]")
    policy = ask(args, "replicate", disk=args.disk, on=on, off=off, rate=args.rate)
    if args.json:
        print_json(policy)
        return
    limit = "unlimited" if policy["rate"] < 0 else f"{format_size(policy['rate'])}/s"
    hosts = ", ".join(policy["hosts"]) or "no host"
    print(f"{args.disk}: kept warm on {hosts}; owner upload for it at most {limit}")


def cmd_jobs(args: argparse.Namespace) -> None:
    jobs = ask(args, "jobs")
    if args.json:
        print_json(jobs)
        return
    from rich.table import Table

    # A VM move's memory: QEMU's stream, then what crossed the link for it (also in "on the wire").
    table = Table("job", "disk", "phase", "progress", "on the wire", "memory stream", "time", "error", box=None)
    for j in jobs:
        share = f"{j['done_bytes'] / j['total_bytes']:.0%}" if j["total_bytes"] else "-"
        memory = (f"{format_size(j['ram_bytes'])} ({format_size(j['ram_wire_bytes'])} sent)"
                  if "ram_bytes" in j else "-")
        table.add_row(str(j["job"]), j["disk"], j["phase"], share, format_size(j["bytes_on_wire"]), memory,
                      f"{j['duration_s']:.1f} s", j["error"])
    console().print(table)


def cmd_jobs_cancel(args: argparse.Namespace) -> None:
    res = ask(args, "job_cancel", job=args.job)
    if args.json:
        print_json(res)
    if not res["cancelled"]:
        fail(f"job {args.job}: {res['message']}")
    if not args.json:
        print(f"job {args.job}: {res['message']}")


def _start(args: argparse.Namespace, op: str, **kwargs: Any) -> tuple[Any, bool]:
    """Ask the daemon to start a job; a Ctrl-C meanwhile is held until its number is known (True), so that
    it cancels the job rather than leave it running unseen."""
    import signal

    pressed: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if pressed:  # pressed again: the person insists
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        reply = ask(args, op, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)
    return reply, bool(pressed)


def _follow_jobs(args: argparse.Namespace, jobs: list[int], title: str, quiet: bool, interrupted: bool = False
                 ) -> list[dict[str, Any]]:
    """Follow a command's jobs to their end. Ctrl-C (or ``interrupted``: pressed while they were started)
    cancels those not yet committing and says, in one line each, what state they left (exit 130); the
    others are followed to their end, unless interrupted again."""
    results: dict[int, dict[str, Any]] = {}
    try:
        for job in [] if interrupted else jobs:
            results[job] = _follow_job(args, job, title, quiet)
        if not interrupted:
            return [results[job] for job in jobs]
    except KeyboardInterrupt:
        pass
    committing, cancelled = [], 0
    for job in jobs:
        if job in results:
            continue
        try:
            res = ask(args, "job_cancel", job=job)
        except ControlError as e:  # it ended meanwhile, or cannot be cancelled: followed below
            print(f"p2pvbd: {title}: {e}", file=sys.stderr)
            committing.append(job)
            continue
        except KeyboardInterrupt:
            print(f"p2pvbd: {title}: interrupted while cancelling; see 'p2pvbd jobs'", file=sys.stderr)
            raise SystemExit(130) from None
        print(f"p2pvbd: {title}: {res['message']}", file=sys.stderr)
        if res["cancelled"]:
            cancelled += 1
        else:
            committing.append(job)
    if not committing:
        raise SystemExit(130)
    try:
        for job in committing:
            results[job] = _follow_job(args, job, title, quiet)
    except KeyboardInterrupt:
        print(f"p2pvbd: {title} goes on in the daemon: see 'p2pvbd jobs'", file=sys.stderr)
        raise SystemExit(130) from None
    if cancelled:  # some of several disks: say how the others ended, and that not all moved
        for job in committing:
            res = results[job]
            print(f"p2pvbd: {title}: {res['disk']}: {res['error'] or 'done'}", file=sys.stderr)
        raise SystemExit(130)
    return [results[job] for job in jobs if job in results]


def _follow_job(args: argparse.Namespace, job: int, title: str, quiet: bool) -> dict[str, Any]:
    """Poll a daemon job until it ends, drawing a progress bar with per-peer rates unless quiet."""
    import time

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[peers]}")]
    with Progress(*columns, disable=quiet or not sys.stderr.isatty(), console=None, transient=True) as bar:
        task = bar.add_task(title, total=None, peers="")
        while True:
            res = ask(args, "job", job=job)
            rates = ", ".join(f"{h} {format_size(p['rate'])}/s" for h, p in sorted(res["peers"].items()))
            description = f"{title} ({res['phase']})" if "phase" in res else title
            if res.get("mirror_lag_blocks"):
                description += f", mirror lag {res['mirror_lag_blocks']} blocks"
            bar.update(task, description=description, total=res["total_bytes"] or None, completed=res["done_bytes"],
                       peers=rates)
            if res["done"]:
                return res
            time.sleep(JOB_POLL_SECONDS)


def cmd_verify(args: argparse.Namespace) -> None:
    res = ask(args, "verify", disk=args.disk)
    if args.json:
        print_json(res)
    elif res["ok"]:
        print(f"{res['disk']}: all {res['blocks']} blocks match their hashes")
    else:
        bad = res["mismatched_blocks"]
        print(f"{res['disk']}: {len(bad)} block(s) do not match their hashes: {bad[:20]}")
    if not res["ok"]:
        raise SystemExit(1)


def cmd_attach(args: argparse.Namespace) -> None:
    ask(args, "nbd_uri", disk=args.disk)  # fails clearly unless the daemon serves this export
    print(attach(home_of(args), args.disk, args.device))


def cmd_detach(args: argparse.Namespace) -> None:
    print(f"detached {detach(home_of(args), args.disk)}")


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS,
                        help="this host's home directory (default: $P2PVBD_HOME, else the user data dir)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output")

    p = argparse.ArgumentParser(prog="p2pvbd", parents=[common],
                                description="Peer-to-peer versioned virtual disks with live migration.")
    p.add_argument("--version", action="version", version=f"p2pvbd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help: str, parents: tuple[argparse.ArgumentParser, ...] = (),
            into: Any = sub) -> argparse.ArgumentParser:
        sp = into.add_parser(name, help=help, description=help, parents=[common, *parents])
        sp.set_defaults(func=func)
        return sp

    sp = add("init", cmd_init, "create this host's identity and home directory")
    sp.add_argument("name", help="this host's name in the swarm, e.g. office-pc")
    sp.add_argument("--listen", metavar="HOST:PORT", help="address peers reach this host on")
    sp.add_argument("--nbd-tcp", metavar="ADDRESS:PORT", help=NBD_TCP_HELP)

    sp = add("join", cmd_join, "join the swarm of an invite (its inviter must be running)")
    sp.add_argument("token", help="the line printed by 'p2pvbd invite' on a swarm member")
    sp.add_argument("name", help="this host's name in the swarm, e.g. car-pc")
    sp.add_argument("--listen", metavar="HOST:PORT", help="address peers reach this host on")
    sp.add_argument("--nbd-tcp", metavar="ADDRESS:PORT", help=NBD_TCP_HELP)

    sp = add("invite", cmd_invite, "print a one-time token with which another machine joins this swarm",
             (as_json,))
    sp.add_argument("--ttl", type=_duration, default=3600, help="how long the token works (default 1h)")
    add("peers", cmd_peers, "the swarm's other hosts: addresses, last seen, reachable", (as_json,))
    sp = add("revoke", cmd_revoke, "remove a host from the swarm for good (a stolen machine): every host refuses "
             "its connections and index records (run on the host that created the swarm)", (as_json,))
    sp.add_argument("host")

    sp = add("daemon", cmd_daemon, "run this host's daemon in the foreground")
    sp.add_argument("--log-file", metavar="FILE", help="log here instead of to stderr")
    sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sp.add_argument("--vm-timeout", type=float, metavar="SECONDS",
                    help="on SIGTERM, how long the guests may take to power off before they are killed (default 30)")

    sp = add("stop", cmd_stop, "stop this host's daemon, shutting its VMs down first (ACPI power button)")
    sp.add_argument("--vm-timeout", type=float, metavar="SECONDS",
                    help="how long the guests may take to power off before they are killed (default 30)")

    disk = add("disk", None, "create, import and list disks")
    dsub = disk.add_subparsers(dest="disk_command", required=True, metavar="SUBCOMMAND")
    sp = add("create", cmd_disk_create, "create an empty disk owned by this host", into=dsub)
    sp.add_argument("disk")
    sp.add_argument("--size", type=_size, required=True,
                    help=f"e.g. 20G, at least one block: {SIZE_RULE}".replace("%", "%%"))
    sp.add_argument("--block-size", type=_size, default=64 * 1024, help="versioning granularity (default 64K)")
    sp = add("import", cmd_disk_import, "create a disk from a raw image file", into=dsub)
    sp.add_argument("disk")
    sp.add_argument("file")
    sp.add_argument("--block-size", type=_size, default=64 * 1024, help="versioning granularity (default 64K)")
    add("list", cmd_disk_list, "list this host's disks", (as_json,), into=dsub)
    sp = add("delete", cmd_disk_delete, "delete this host's replica of a disk: its files, and its entry in the "
             "index (refused while a VM, a migration or a sync uses it)", (as_json,), into=dsub)
    sp.add_argument("disk")
    sp.add_argument("--force", action="store_true",
                    help="delete it even if this host owns it (its data may then exist nowhere else)")
    sp = add("claim", cmd_disk_claim, "take over a disk whose owner was revoked (a lost machine), from this "
             "host's replica", (as_json,), into=dsub)
    sp.add_argument("disk")

    sp = add("nbd-client-cert", cmd_nbd_client_cert,
             "write a client certificate for NBD over TLS (the --nbd-tcp listener) in the layout qemu and libnbd read")
    sp.add_argument("dir", metavar="DIR", help="where to write ca-cert.pem, client-cert.pem and client-key.pem")
    sp.add_argument("--name", help="the client's name in its certificate and the daemon's log (default nbd-client)")
    sp = add("nbd-uri", cmd_nbd_uri, "print the NBD URI of a disk (for qemu, nbdinfo, nbdcopy, libnbd)")
    sp.add_argument("disk")
    sp = add("status", cmd_status, "disks, owners and replica coverage", (as_json,))
    sp.add_argument("disk", nargs="?")
    sp = add("sync", cmd_sync, "bring this host's replica of a disk to the owner's versions, from many peers",
             (as_json,))
    sp.add_argument("disk")
    sp.add_argument("--from", dest="sources", metavar="HOST,…", help="only pull from these hosts")
    sp = add("migrate", cmd_migrate, "move disks this host owns to another host while their guest runs",
             (as_json,))
    sp.add_argument("disks", nargs="*", metavar="DISK|VM",
                    help="disks, or one VM (moved with its memory and all its disks); default: every disk this "
                         "host owns")
    sp.add_argument("--to", required=True, metavar="HOST", help="the new owner")
    sp.add_argument("--mode", choices=("sync", "async"), default="async",
                    help="sync: a write is acknowledged once both hosts have it; async (default): shipped after")
    sp.add_argument("--max-downtime", type=float, default=50, metavar="MS",
                    help="switch over once the rest ships within this many milliseconds (default 50)")
    from p2pvbd.cli import vm as cli_vm

    cli_vm.add_parsers(add, as_json)
    from p2pvbd.cli import libvirt as cli_libvirt

    cli_libvirt.add_parsers(add, as_json)
    sp = add("replicate", cmd_replicate, "keep replicas of a disk warm on other hosts in the background",
             (as_json,))
    sp.add_argument("disk")
    sp.add_argument("--on", metavar="HOST,…", help="hosts that keep a warm replica")
    sp.add_argument("--off", metavar="HOST,…", help="hosts that stop keeping one")
    sp.add_argument("--rate", type=_rate, help="cap on the owner's upload for it, e.g. 20M (bytes/s) or 100mbit")
    sp = add("jobs", cmd_jobs, "syncs, migrations and VM moves this daemon ran or is running, with their progress",
             (as_json,))
    jsub = sp.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")
    sp = add("cancel", cmd_jobs_cancel, "stop a job before its commit (a migration's source then still owns the "
             "disk; a sync keeps what it pulled)", (as_json,), into=jsub)
    sp.add_argument("job", type=int, metavar="ID", help="the job's number in 'p2pvbd jobs'")
    sp = add("verify", cmd_verify, "re-hash every block of a disk against its recorded hash", (as_json,))
    sp.add_argument("disk")
    sp = add("attach", cmd_attach, "connect a disk to a kernel block device and print its path")
    sp.add_argument("disk")
    sp.add_argument("--device", metavar="/dev/nbdN", help="the nbd device to use (kernel nbd module only)")
    sp = add("detach", cmd_detach, "disconnect a disk attached with 'attach'")
    sp.add_argument("disk")
    sp = add("completion", cmd_completion, "print a shell completion script: eval \"$(p2pvbd completion bash)\"")
    sp.add_argument("shell", choices=("bash",))
    return p


def cmd_completion(args: argparse.Namespace) -> None:
    from p2pvbd.cli.completion import bash_script

    print(bash_script(build_parser()), end="")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "home"):
        args.home = None
    try:
        args.func(args)
    except (ControlError, HomeError, AttachError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
