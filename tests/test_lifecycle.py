"""Deleting what a user made, and changing a VM without replacing it by surprise: `disk delete`, `vm create`
on a known name, `vm set`, `vm delete`, through the CLI against real daemons."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.daemons import Host
from tests.helpers import invite, wait_until

# A disk of this size holds 10 TiB / 64 KiB = 160 Mi blocks: 3.75 GiB of metadata if it were ever loaded.
HUGE = "10T"
# The daemon's peak resident memory after creating and deleting the huge disk stays below this: its
# metadata, 24 bytes a block, would take 3.75 GiB; the daemon itself takes about 100 MiB.
HUGE_DELETE_PEAK_BYTES = 1 << 30


def disks(host: Host) -> list[str]:
    return [d["name"] for d in host.json("disk", "list")]


def peak_rss(host: Host) -> int:
    assert host.proc is not None
    for line in Path(f"/proc/{host.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def one_line_error(res: object, *parts: str) -> str:
    """The command failed with one line naming ``parts``, no traceback."""
    rc, err = res.returncode, res.stderr  # type: ignore[attr-defined]
    assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (rc, err)
    assert all(p in err for p in parts), err
    return str(err)


def test_a_replica_is_deleted_with_its_files_and_its_index_entry(make_host: Callable[..., Host]) -> None:
    office = make_host("office-pc")
    home = make_host("home-pc", join=invite(office))
    office.cli("disk", "create", "d1", "--size", "4M")
    wait_until(lambda: home.cli("sync", "d1", check=False).returncode == 0, "home-pc to sync d1")
    wait_until(lambda: {r["host"] for r in office.json("status", "d1")["disks"][0]["replicas"]}
               == {"office-pc", "home-pc"}, "office-pc to see home-pc's replica")

    res = home.cli("disk", "delete", "d1", check=False)
    assert res.returncode == 0 and res.stdout.startswith("deleted this host's replica of d1"), res
    assert not (home.home / "disks" / "d1").exists()
    assert not list((home.home / "disks").glob(".deleted-*")), "nothing is left aside"
    assert "d1" not in disks(home)
    # The index says so: office-pc stops listing (and asking) home-pc for d1.
    wait_until(lambda: {r["host"] for r in office.json("status", "d1")["disks"][0]["replicas"]} == {"office-pc"},
               "office-pc to see home-pc's replica gone")
    one_line_error(home.cli("disk", "delete", "d1", check=False), "no disk named 'd1'")

    # The owner's disk only with --force: its data may exist nowhere else.
    one_line_error(office.cli("disk", "delete", "d1", check=False), "office-pc owns d1", "--force")
    assert "d1" in disks(office)
    office.cli("disk", "delete", "d1", "--force")
    assert "d1" not in disks(office) and not (office.home / "disks" / "d1").exists()

    # A disk created far too large by mistake goes without its metadata ever being loaded or written.
    office.cli("disk", "create", "huge", "--size", HUGE)
    res = office.cli("disk", "delete", "huge", "--force", check=False)
    assert res.returncode == 0, res.stderr
    assert not (office.home / "disks" / "huge").exists()
    assert peak_rss(office) < HUGE_DELETE_PEAK_BYTES, peak_rss(office)
    # A restart finds nothing of either disk.
    office.stop()
    office.start()
    assert disks(office) == []


def test_a_deletion_cut_short_by_a_crash_leaves_no_replica(make_host: Callable[..., Host]) -> None:
    """What a crash after the rename leaves aside is never served, and goes at the next start."""
    office = make_host("office-pc")
    office.cli("disk", "create", "d1", "--size", "4M")
    office.stop()
    (office.home / "disks" / "d1").rename(office.home / "disks" / ".deleted-d1.1")
    (office.home / "vms" / ".deleted-vm1.1").mkdir(parents=True)  # a `vm delete` cut short likewise
    (office.home / "vms" / ".deleted-vm1.1" / "ram.img").write_bytes(b"memory")
    office.start()
    assert disks(office) == []
    assert not list((office.home / "disks").glob(".deleted-*"))
    wait_until(lambda: not list((office.home / "vms").glob(".deleted-*")), "the VM's leftovers to go")


def test_a_vm_is_changed_only_when_asked_and_deleted_everywhere(make_host: Callable[..., Host],
                                                                  tmp_path: Path) -> None:
    office = make_host("office-pc")
    car = make_host("car-pc", join=invite(office))
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    office.cli("disk", "create", "d1", "--size", "16M")
    office.cli("vm", "create", "vm1", "--disk", "d1", "--memory", "128M", "--kernel", str(kernel),
               "--initrd", str(initrd))

    def vm(host: Host) -> dict[str, object] | None:
        return next((v for v in host.json("vm", "list") if v["name"] == "vm1"), None)

    # Creating it again is refused: the definition, kernel and initrd included, stays as it was.
    one_line_error(office.cli("vm", "create", "vm1", "--disk", "d1", check=False),
                   "vm1 exists; change it with `p2pvbd vm set` or `vm create --replace`")
    assert (v := vm(office)) is not None and v["host_parts"]["kernel"] == str(kernel), v  # type: ignore[index]

    wait_until(lambda: car.cli("vm", "approve", "vm1", check=False).returncode == 0, "car-pc to approve vm1")
    res = office.cli("vm", "set", "vm1", "--memory", "256M", check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("VM vm1 changed: memory; it takes effect at its next start; hosts that approved "
                                  "it must approve it again ('p2pvbd vm approve vm1' there) before it runs or "
                                  "moves there"), res.stdout
    v = vm(office)
    assert v is not None and v["memory"] == 256 << 20 and v["host_parts"]["kernel"] == str(kernel), v  # type: ignore[index]
    # car-pc learns the owner's signed change, and its old approval no longer covers it.
    wait_until(lambda: (c := vm(car)) is not None and c["memory"] == 256 << 20, "car-pc to learn the change")
    assert vm(car)["approved"] is False  # type: ignore[index]
    one_line_error(car.cli("vm", "set", "vm1", "--cpus", "2", check=False), "car-pc does not own disk 'd1'")

    # --replace defines it anew: what is not given takes its default (no kernel: nothing to approve).
    res = office.cli("vm", "create", "vm1", "--disk", "d1", "--replace", check=False)
    assert res.returncode == 0 and res.stdout.startswith("VM vm1 changed: memory, kernel, initrd"), res
    assert "approve" not in res.stdout

    # Deleted on its owner, it goes on every host, with each host's files of it (here a memory image
    # car-pc kept from an earlier run); its disk stays; the name can be used again.
    (car.home / "vms" / "vm1").mkdir(parents=True)
    (car.home / "vms" / "vm1" / "ram.img").write_bytes(b"memory")
    one_line_error(car.cli("vm", "delete", "vm1", check=False), "only the owner of VM vm1's disk d1",
                   "run this on office-pc")
    res = office.cli("vm", "delete", "vm1", check=False)
    assert res.returncode == 0 and res.stdout.startswith("deleted VM vm1 on every host; its disks stay"), res
    assert vm(office) is None and "d1" in disks(office)
    wait_until(lambda: vm(car) is None, "car-pc to see vm1 deleted")
    wait_until(lambda: not (car.home / "vms" / "vm1").exists(), "car-pc to remove its files of vm1")
    assert not (office.home / "vms" / "vm1").exists()
    one_line_error(office.cli("vm", "start", "vm1", check=False), "no VM named 'vm1'")
    office.cli("vm", "create", "vm1", "--disk", "d1")
    wait_until(lambda: vm(car) is not None, "car-pc to learn the new vm1")
