"""End-to-end: real NBD clients nobody here wrote (qemu-io, qemu-img, nbdinfo, nbdcopy, fio, libnbd)
against a real daemon in a subprocess.

Every timeout here is a hang guard, never a speed assertion.  libnbd's Python binding is a Debian
package that imports only under /usr/bin/python3, so those cases run an inline script there and
report facts as JSON, which the test then checks.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import Host, env_without_venv, run, system_python

MiB = 1 << 20
KiB = 1 << 10
DISK_SIZE = 64 * MiB
BLOCK = 64 * KiB  # the daemon's default block size: whole blocks become holes when zeroed
HANG_GUARD = 180.0  # seconds; only bounds a hung client


@pytest.fixture
def disk(host: Host) -> str:
    host.cli("disk", "create", "vm1", "--size", "64M", "--block-size", "64K")
    return "vm1"


_UNITS = {"": 1, "k": KiB, "M": MiB, "G": 1 << 30}
_TERM = re.compile(r"([+-]?)(\d+)([kMG]?)")


def _eval_size(token: str) -> str:
    """qemu-io takes no arithmetic: turn "2M+100" into "2097252" (other tokens pass unchanged)."""
    if not re.fullmatch(r"\d+[kMG]?([+-]\d+[kMG]?)+", token):
        return token
    total = sum((-1 if sign == "-" else 1) * int(n) * _UNITS[unit] for sign, n, unit in _TERM.findall(token))
    return str(total)


def qemu_io(uri: str, *commands: str, check: bool = True, read_only: bool = False) -> str:
    """Run qemu-io commands on the export; with check, fail on a non-zero exit or any failed command.

    Some qemu-io versions exit 0 after "Pattern verification failed", so its output is checked too. A standby
    export is flagged read-only, and qemu-io opens those only with ``read_only``.
    """
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", " ".join(map(_eval_size, c.split()))]
    res = run(*args, uri, check=False, timeout=HANG_GUARD)
    out = res.stdout + res.stderr
    if check:
        assert res.returncode == 0, f"qemu-io {commands} exited {res.returncode}:\n{out}"
        assert "Pattern verification failed" not in out, out
        assert "failed" not in out.lower(), out
    return out


def libnbd(script: str, *args: str) -> Any:
    """Run a libnbd script under the system Python; it prints one JSON document as its last line."""
    res = run(system_python(), "-c", script, *args, timeout=HANG_GUARD, env=env_without_venv())
    return json.loads(res.stdout.strip().splitlines()[-1])


def verify_ok(host: Host, disk: str) -> None:
    res = host.cli("verify", disk, check=False)
    assert res.returncode == 0, f"verify {disk} exited {res.returncode}: {res.stdout}{res.stderr}"
    report = host.json("verify", disk)
    assert report["ok"] is True and report["mismatched_blocks"] == [], report


def random_image(path: Path, seed: int) -> bytes:
    """A 64 MiB raw image: random data with an aligned zero run, an unaligned one, and a zero tail."""
    rng = random.Random(seed)
    img = bytearray(rng.randbytes(DISK_SIZE))
    img[8 * MiB : 12 * MiB] = bytes(4 * MiB)  # whole blocks of zeroes
    img[20 * MiB + 1000 : 20 * MiB + 200_000] = bytes(199_000)  # zeroes not on block boundaries
    img[60 * MiB :] = bytes(4 * MiB)
    path.write_bytes(img)
    return bytes(img)


def nbdinfo_map(uri: str) -> list[tuple[int, int, str]]:
    res = run("nbdinfo", "--map", "--json", uri, timeout=HANG_GUARD)
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(res.stdout)]


# --- qemu-io ------------------------------------------------------------------------------------------


def test_qemu_io_write_read_zero_discard_flush(host: Host, disk: str) -> None:
    uri = host.uri(disk)
    qemu_io(uri,
            "write -P 0x5a 0 4M",
            "write -P 0xa5 1000 5000",  # unaligned, inside the first block
            "write -P 0x11 63M 1M",  # the last MiB
            "write -z 1M 256k",  # whole blocks
            "write -z 2M+100 3000",  # part of a block
            "discard 3M 128k",
            "flush")
    qemu_io(uri,
            "read -P 0x5a 0 1000",
            "read -P 0xa5 1000 5000",
            "read -P 0x5a 6000 1042576",  # up to 1M
            "read -P 0x00 1M 256k",
            "read -P 0x5a 1280k 768k",
            "read -P 0x5a 2M 100",
            "read -P 0x00 2M+100 3000",
            "read -P 0x5a 2M+3100 1045476",  # up to 3M
            "read -P 0x00 3M 128k",
            "read -P 0x5a 3M+128k 896k",  # up to 4M
            "read -P 0x00 4M 59M",  # never written
            "read -P 0x11 63M 1M")
    # The pattern check is live: a wrong pattern is reported (and would fail the checks above).
    out = qemu_io(uri, "read -P 0x5b 0 64k", check=False)
    assert "Pattern verification failed" in out, out
    verify_ok(host, disk)


# --- qemu-img / nbdcopy ---------------------------------------------------------------------------------


def test_qemu_img_convert_in_and_out_then_compare(host: Host, disk: str, tmp_path: Path) -> None:
    uri = host.uri(disk)
    image = tmp_path / "image.raw"
    random_image(image, seed=1)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri, timeout=HANG_GUARD)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri,
               check=False, timeout=HANG_GUARD).returncode == 0
    out_qemu = tmp_path / "out-qemu.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out_qemu), timeout=HANG_GUARD)
    out_copy = tmp_path / "out-nbdcopy.raw"
    run("nbdcopy", uri, str(out_copy), timeout=HANG_GUARD)
    for out in (out_qemu, out_copy):
        res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(out),
                  check=False, timeout=HANG_GUARD)
        assert res.returncode == 0, f"{out.name}: {res.stdout}{res.stderr}"
    # compare is live: one changed byte in the export is found.
    qemu_io(uri, "write -P 0x42 5M 1")
    res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri, check=False, timeout=HANG_GUARD)
    assert res.returncode == 1, res.stdout + res.stderr
    verify_ok(host, disk)


def test_nbdcopy_into_export_matches_image(host: Host, disk: str, tmp_path: Path) -> None:
    uri = host.uri(disk)
    image = tmp_path / "image.raw"
    random_image(image, seed=2)
    run("nbdcopy", str(image), uri, timeout=HANG_GUARD)
    res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri, check=False, timeout=HANG_GUARD)
    assert res.returncode == 0, res.stdout + res.stderr
    verify_ok(host, disk)


# --- nbdinfo --------------------------------------------------------------------------------------------


def test_nbdinfo_map_shows_holes_after_discard_and_write_zeroes(host: Host, disk: str) -> None:
    uri = host.uri(disk)
    assert nbdinfo_map(uri) == [(0, DISK_SIZE, "hole,zero")]  # a new disk is all holes
    qemu_io(uri,
            "write -P 0x77 0 4M",
            "write -z 1M 128k",  # 2 whole blocks
            "discard 2M 256k",  # 4 whole blocks
            "write -z 3M 1000",  # part of a block: stays data
            "discard 3M+64k+512 4096",  # part of a block: stays data
            "flush")
    assert nbdinfo_map(uri) == [
        (0, 1 * MiB, "data"),
        (1 * MiB, 128 * KiB, "hole,zero"),
        (1 * MiB + 128 * KiB, 1 * MiB - 128 * KiB, "data"),
        (2 * MiB, 256 * KiB, "hole,zero"),
        (2 * MiB + 256 * KiB, 2 * MiB - 256 * KiB, "data"),
        (4 * MiB, DISK_SIZE - 4 * MiB, "hole,zero"),
    ]
    # Writing data over a hole makes it data again.
    qemu_io(uri, "write -P 0x01 1M 64k")
    assert nbdinfo_map(uri)[:3] == [(0, 1 * MiB + 64 * KiB, "data"), (1 * MiB + 64 * KiB, 64 * KiB, "hole,zero"),
                                    (1 * MiB + 128 * KiB, 1 * MiB - 128 * KiB, "data")]


def test_nbdinfo_json_reports_size_and_capabilities(host: Host, disk: str) -> None:
    info = json.loads(run("nbdinfo", "--json", host.uri(disk), timeout=HANG_GUARD).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == disk
    assert export["export-size"] == DISK_SIZE
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache", "can_fast_zero"):
        assert export[cap] is True, (cap, export)
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]


def test_nbdinfo_list_shows_every_export(host: Host) -> None:
    host.cli("disk", "create", "alpha", "--size", "64M")
    host.cli("disk", "create", "beta", "--size", "32M")
    res = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={host.nbd_socket}", timeout=HANG_GUARD)
    exports = {e["export-name"]: e for e in json.loads(res.stdout)["exports"]}
    assert set(exports) == {"alpha", "beta"}
    assert exports["alpha"]["export-size"] == 64 * MiB
    assert exports["beta"]["export-size"] == 32 * MiB


# --- fio --------------------------------------------------------------------------------------------------


def _fio(uri: str, rw: str, bs: str, tmp_path: Path, *extra: str) -> tuple[int, list[dict[str, Any]], str]:
    """Two jobs (two NBD connections) at once, each on its own 32 MiB half of the disk."""
    res = run("fio", "--name=nbdtest", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
              "--iodepth=16", "--size=32M", "--numjobs=2", "--offset_increment=32M", "--verify=crc32c",
              "--output-format=json", *extra, check=False, timeout=HANG_GUARD, cwd=tmp_path)
    # The nbd engine prints "fio: connected to NBD server" on stdout before the JSON document.
    jobs = json.loads(res.stdout[res.stdout.index("{"):])["jobs"] if "{" in res.stdout else []
    return res.returncode, jobs, res.stdout + res.stderr


@pytest.mark.parametrize("bs", ["4k", "1M"])
def test_fio_random_write_then_verified_random_read(host: Host, disk: str, tmp_path: Path, bs: str) -> None:
    uri = host.uri(disk)
    rc, jobs, out = _fio(uri, "randwrite", bs, tmp_path, "--do_verify=0")
    assert rc == 0, out
    assert len(jobs) == 2 and all(j["error"] == 0 and j["write"]["io_bytes"] == 32 * MiB for j in jobs), out
    rc, jobs, out = _fio(uri, "randread", bs, tmp_path, "--do_verify=1")
    assert rc == 0, out
    assert "verify:" not in out, out
    assert len(jobs) == 2 and all(j["error"] == 0 and j["read"]["io_bytes"] == 32 * MiB for j in jobs), out
    # The verification is live: a block changed behind fio's back is reported.
    qemu_io(uri, "write -P 0x33 40M 4k")
    rc, jobs, out = _fio(uri, "randread", bs, tmp_path, "--do_verify=1")
    assert rc != 0 and "verify:" in out, out
    verify_ok(host, disk)


# --- libnbd -----------------------------------------------------------------------------------------------

PIPELINED = r"""
import json, random, sys
import nbd

rng = random.Random(7)
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
done = {}  # request index -> error value

def cb(i):
    def completion(err):
        done[i] = err.value
        return 1
    return completion

def drain():
    while h.aio_in_flight() > 0:
        h.poll(-1)

# 64 disjoint regions of very different sizes, at shuffled (so out-of-order) offsets.
sizes = [1, 511, 4096, 4097, 65536, 65537, 200_000, 1 << 20] * 8
rng.shuffle(sizes)
regions, off = [], 0
for n in sizes:
    off += rng.randrange(0, 3000)
    regions.append((off, n))
    off += n
assert off < size // 2
order = list(range(64))
rng.shuffle(order)
data = {i: rng.randbytes(regions[i][1]) for i in range(64)}

# Phase 1: 64 writes in flight at once (every 8th with FUA), then a flush.
bufs = {}
for i in order:
    o, n = regions[i]
    bufs[i] = nbd.Buffer.from_bytearray(bytearray(data[i]))
    h.aio_pwrite(bufs[i], o, completion=cb(i), flags=nbd.CMD_FLAG_FUA if i % 8 == 0 else 0)
in_flight_writes = h.aio_in_flight()
drain()
write_errors = {i: e for i, e in done.items() if e}
completed = [len(done)]
h.flush()

# Phase 2: 64 reads of those regions in flight at once, in another shuffled order.
done.clear()
rng.shuffle(order)
rbufs = {}
for i in order:
    o, n = regions[i]
    rbufs[i] = nbd.Buffer(n)
    h.aio_pread(rbufs[i], o, completion=cb(i))
in_flight_reads = h.aio_in_flight()
drain()
read_errors = {i: e for i, e in done.items() if e}
completed.append(len(done))
bad_reads = [i for i in range(64) if bytes(rbufs[i].to_bytearray()) != data[i]]

# Phase 3: 32 reads of old regions and 32 writes to new ones (upper half), all in flight together.
done.clear()
new = {}
mixed = []
for k in range(64):
    if k % 2:
        i = rng.randrange(64)
        b = nbd.Buffer(regions[i][1])
        mixed.append(("r", i, b))
        h.aio_pread(b, regions[i][0], completion=cb(k))
    else:
        o, n = size // 2 + k * 300_000 + rng.randrange(4096), rng.choice([1, 4096, 65536, 100_000])
        new[k] = (o, rng.randbytes(n))
        b = nbd.Buffer.from_bytearray(bytearray(new[k][1]))
        mixed.append(("w", k, b))
        h.aio_pwrite(b, o, completion=cb(k))
drain()
mixed_errors = {i: e for i, e in done.items() if e}
completed.append(len(done))
bad_mixed = [i for kind, i, b in mixed if kind == "r" and bytes(b.to_bytearray()) != data[i]]
bad_new = [k for k, (o, d) in new.items() if h.pread(len(d), o) != d]
# The gaps between the regions were never written and must still read as zeroes.
gaps = [(o + n, regions[k + 1][0] - o - n) for k, (o, n) in enumerate(regions[:-1])]
bad_gaps = [g for g in gaps if g[1] and h.pread(g[1], g[0]) != bytes(g[1])]
h.shutdown()
print(json.dumps({"completed": completed, "in_flight_writes": in_flight_writes, "in_flight_reads": in_flight_reads,
                  "write_errors": write_errors, "read_errors": read_errors, "mixed_errors": mixed_errors,
                  "bad_reads": bad_reads, "bad_mixed": bad_mixed, "bad_new": bad_new, "bad_gaps": bad_gaps}))
"""


def test_libnbd_64_pipelined_requests_out_of_order(host: Host, disk: str) -> None:
    r = libnbd(PIPELINED, host.uri(disk))
    assert r["in_flight_writes"] == 64 and r["in_flight_reads"] == 64, r  # all 64 really were in flight
    assert r["completed"] == [64, 64, 64], r  # every request got exactly one completion
    assert r["write_errors"] == {} and r["read_errors"] == {} and r["mixed_errors"] == {}, r
    assert r["bad_reads"] == [] and r["bad_mixed"] == [] and r["bad_new"] == [] and r["bad_gaps"] == [], r
    verify_ok(host, disk)


MULTI_CONN = r"""
import json, sys
import nbd

uri = sys.argv[1]
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(uri)
b.connect_uri(uri)
MiB = 1 << 20
A = bytes([0xA1]) * (3 * MiB + 17)  # written by connection a at 0
B = bytes([0xB2]) * (2 * MiB + 5)  # written by connection b at 8 MiB
ba, bb = nbd.Buffer.from_bytearray(bytearray(A)), nbd.Buffer.from_bytearray(bytearray(B))
a.aio_pwrite(ba, 0)
b.aio_pwrite(bb, 8 * MiB)
while a.aio_in_flight() or b.aio_in_flight():  # both writes in flight on two connections at once
    if a.aio_in_flight():
        a.poll(-1)
    if b.aio_in_flight():
        b.poll(-1)
# Multi-conn: a flush on one connection covers writes completed on every connection.
a.flush()
out = {"can_multi_conn": a.can_multi_conn(),
       "a_sees_b": a.pread(len(B), 8 * MiB) == B,
       "b_sees_a": b.pread(len(A), 0) == A}
# Interleaved small writes: each connection overwrites what the other just wrote, then reads it back.
mismatch = []
for k in range(200):
    w, r = (a, b) if k % 2 else (b, a)
    data = bytes([k % 251]) * (1000 + k)
    w.pwrite(data, 16 * MiB + (k % 7) * 512)
    w.flush()
    if r.pread(len(data), 16 * MiB + (k % 7) * 512) != data:
        mismatch.append(k)
out["interleaved_mismatches"] = mismatch
a.shutdown()
b.shutdown()
print(json.dumps(out))
"""


def test_libnbd_two_connections_see_each_others_writes(host: Host, disk: str) -> None:
    r = libnbd(MULTI_CONN, host.uri(disk))
    assert r == {"can_multi_conn": True, "a_sees_b": True, "b_sees_a": True, "interleaved_mismatches": []}
    verify_ok(host, disk)


# Each case runs on its own connection (strict mode off, so libnbd sends what it is told), then the
# same connection must still serve a normal read.
INVALID = r"""
import errno, json, sys
import nbd

uri, structured, cases = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
MiB = 1 << 20
out = {}
for case in cases:
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    size = h.get_size()
    out["structured"] = h.get_structured_replies_negotiated()
    h.pwrite(b"\x5a" * 4096, 0)
    run = {
        "read_straddling_end": lambda: h.pread(8192, size - 4096),
        "read_beyond_end": lambda: h.pread(4096, size + 4096),
        "read_huge_offset": lambda: h.pread(512, (1 << 63) - 512),
        "read_over_32MiB": lambda: h.pread(40 * MiB, 0),
        "write_straddling_end": lambda: h.pwrite(b"x" * 8192, size - 4096),
        "write_beyond_end": lambda: h.pwrite(b"x" * 512, size),
        "zero_straddling_end": lambda: h.zero(8192, size - 4096),
        "trim_straddling_end": lambda: h.trim(8192, size - 4096),
        "write_zero_length": lambda: h.pwrite(b"", 4096),
        "zero_zero_length": lambda: h.zero(0, 4096),
        "trim_zero_length": lambda: h.trim(0, 4096),
        "read_zero_length": lambda: h.pread(0, 4096),
        "read_flag_df_not_negotiated": lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF),
        "trim_flag_fast_zero": lambda: h.trim(65536, 0, nbd.CMD_FLAG_FAST_ZERO),
        "zero_flag_fast_zero_part_of_block": lambda: h.zero(8192, 4096, nbd.CMD_FLAG_FAST_ZERO),
        "zero_flag_fast_zero_whole_blocks": lambda: h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO),
        "write_flag_req_one": lambda: h.pwrite(b"y" * 512, MiB, nbd.CMD_FLAG_REQ_ONE),
        "read_undefined_flag_bit7": lambda: h.pread(512, 0, 1 << 7),
    }[case]
    try:
        run()
        err = None
    except nbd.Error as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
    try:
        after = "ok" if h.pread(4096, 0) == b"\x5a" * 4096 else "wrong data"
    except nbd.Error as e:
        after = str(e)
    try:
        untouched = h.pread(8192, 8192) == bytes(8192)  # no case may have written here
    except nbd.Error:
        untouched = None
    out[case] = {"error": err, "after": after, "untouched": untouched}
    del h  # closes the connection
print(json.dumps(out))
"""

# case -> errnos the NBD spec allows (proto.md, "Error values" and the command descriptions).
INVALID_CASES = {
    "read_straddling_end": {"EINVAL"},  # "SHOULD return NBD_EINVAL if it receives a read ... beyond"
    "read_beyond_end": {"EINVAL"},
    "read_huge_offset": {"EINVAL"},
    "read_over_32MiB": {"EINVAL", "EOVERFLOW"},  # beyond the advertised maximum block size
    "write_straddling_end": {"ENOSPC", "EINVAL"},  # "SHOULD return NBD_ENOSPC if ... write ... beyond"
    "write_beyond_end": {"ENOSPC", "EINVAL"},
    "zero_straddling_end": {"ENOSPC", "EINVAL"},
    "trim_straddling_end": {"ENOSPC", "EINVAL"},  # spec says EINVAL; see the strict test below
}


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_libnbd_invalid_requests_fail_with_spec_errno_and_connection_survives(
        host: Host, disk: str, structured: bool) -> None:
    r = libnbd(INVALID, host.uri(disk), "1" if structured else "0", *INVALID_CASES)
    assert r.pop("structured") is structured
    for case, allowed in INVALID_CASES.items():
        assert r[case]["error"] in allowed, (case, r[case])
        assert r[case]["after"] == "ok", (case, r[case])  # the connection still serves a normal read
        assert r[case]["untouched"] is True, (case, r[case])
    assert host.alive()
    verify_ok(host, disk)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_libnbd_zero_length_writes_keep_the_connection(host: Host, disk: str, structured: bool) -> None:
    """Spec: the behaviour of a zero-length request is unspecified, but the server SHOULD NOT disconnect."""
    cases = ["write_zero_length", "zero_zero_length", "trim_zero_length"]
    r = libnbd(INVALID, host.uri(disk), "1" if structured else "0", *cases)
    for case in cases:
        assert r[case]["after"] == "ok", (case, r[case])


def test_libnbd_zero_length_read_simple_reply_keeps_the_connection(host: Host, disk: str) -> None:
    r = libnbd(INVALID, host.uri(disk), "0", "read_zero_length")
    assert r["read_zero_length"]["after"] == "ok", r


def test_libnbd_zero_length_read_structured_keeps_the_connection(host: Host, disk: str) -> None:
    r = libnbd(INVALID, host.uri(disk), "1", "read_zero_length")
    assert r["read_zero_length"]["after"] == "ok", r


def test_libnbd_unsupported_command_flags_fail_with_einval(host: Host, disk: str) -> None:
    cases = ["read_flag_df_not_negotiated", "trim_flag_fast_zero", "write_flag_req_one", "read_undefined_flag_bit7"]
    r = libnbd(INVALID, host.uri(disk), "1", *cases)
    for case in cases:
        assert r[case]["after"] == "ok", (case, r[case])
    for case in cases:
        assert r[case]["error"] == "EINVAL", (case, r[case])


def test_libnbd_fast_zero_is_refused_unless_it_covers_whole_blocks(host: Host, disk: str) -> None:
    """Spec: with FAST_ZERO the server "MUST fail quickly with NBD_ENOTSUP unless the request can be serviced in
    less time than a corresponding NBD_CMD_WRITE"; zeroing part of a 64 KiB block is a write of zeros."""
    cases = ["zero_flag_fast_zero_part_of_block", "zero_flag_fast_zero_whole_blocks"]
    r = libnbd(INVALID, host.uri(disk), "1", *cases)
    assert r["zero_flag_fast_zero_part_of_block"]["error"] == "ENOTSUP", r
    assert r["zero_flag_fast_zero_whole_blocks"]["error"] is None, r
    for case in cases:
        assert r[case]["after"] == "ok" and r[case]["untouched"] is True, (case, r[case])


def test_libnbd_trim_past_end_fails_with_einval(host: Host, disk: str) -> None:
    r = libnbd(INVALID, host.uri(disk), "1", "trim_straddling_end")
    assert r["trim_straddling_end"]["error"] == "EINVAL", r


BLOCK_STATUS = r"""
import json, sys
import nbd

MiB, KiB = 1 << 20, 1 << 10
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
h.pwrite(b"\x11" * (4 * MiB), 0)
h.zero(128 * KiB, 1 * MiB)  # 2 whole blocks
h.trim(256 * KiB, 2 * MiB)  # 4 whole blocks
h.zero(1000, 3 * MiB)  # part of a block
h.flush()

def query(length, offset, flags=0):
    # Collect extents until the range is covered (a server may answer with fewer than asked).
    got, pos, end = [], offset, offset + length
    while pos < end:
        chunk = []
        def cb(ctx, off, entries, err):
            chunk.append((ctx, off, list(entries)))
            return 0
        h.block_status(end - pos, pos, cb, flags)
        (ctx, off, entries), = chunk
        assert ctx == "base:allocation" and off == pos, (ctx, off, pos)
        for n, fl in zip(entries[::2], entries[1::2]):
            n = min(n, end - pos)
            if got and got[-1][2] == fl and got[-1][0] + got[-1][1] == pos:
                got[-1][1] += n
            else:
                got.append([pos, n, fl])
            pos += n
            if pos >= end:
                break
        if flags:
            break
    return got

one = []
h.block_status(8 * MiB, 0, lambda ctx, off, e, err: one.append(list(e)) or 0, nbd.CMD_FLAG_REQ_ONE)
out = {"negotiated": h.can_meta_context("base:allocation"), "extents": query(8 * MiB, 0),
       "unaligned": query(100 * KiB, 2 * MiB + 3), "req_one": one,
       "size": h.get_size(), "tail": query(h.get_size() - 8 * MiB, 8 * MiB)}
h.shutdown()
print(json.dumps(out))
"""


def test_libnbd_block_status_base_allocation(host: Host, disk: str) -> None:
    r = libnbd(BLOCK_STATUS, host.uri(disk))
    hz = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO
    assert r["negotiated"] is True
    assert r["extents"] == [
        [0, 1 * MiB, 0],
        [1 * MiB, 128 * KiB, hz],
        [1 * MiB + 128 * KiB, 1 * MiB - 128 * KiB, 0],
        [2 * MiB, 256 * KiB, hz],
        [2 * MiB + 256 * KiB, 2 * MiB - 256 * KiB, 0],
        [4 * MiB, 4 * MiB, hz],
    ]
    assert r["unaligned"] == [[2 * MiB + 3, 100 * KiB, hz]]
    (one,) = r["req_one"]
    assert one == [1 * MiB, 0]  # REQ_ONE: a single extent, the first one
    assert r["tail"] == [[8 * MiB, DISK_SIZE - 8 * MiB, hz]]


# --- p2pvbd itself: import, restart, crash ------------------------------------------------------------------


def test_disk_import_then_export_matches_file(host: Host, tmp_path: Path) -> None:
    image = tmp_path / "debian.raw"
    random_image(image, seed=3)
    host.cli("disk", "import", "vm2", str(image))
    (listed,) = [d for d in host.json("disk", "list") if d["name"] == "vm2"]
    assert listed["size"] == DISK_SIZE
    uri = host.uri("vm2")
    res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri, check=False, timeout=HANG_GUARD)
    assert res.returncode == 0, res.stdout + res.stderr
    holes = [(o, n) for o, n, kind in nbdinfo_map(uri) if kind == "hole,zero"]
    assert (8 * MiB, 4 * MiB) in holes and (60 * MiB, 4 * MiB) in holes, holes  # zero regions stayed sparse
    verify_ok(host, "vm2")


def test_data_survives_clean_restart(host: Host, disk: str) -> None:
    uri = host.uri(disk)
    qemu_io(uri, "write -P 0x3c 0 2M", "write -P 0xc3 10M+123 70000", "write -z 512k 128k",
            "discard 1M 64k")  # no flush: a clean stop must persist everything
    assert host.stop() == 0
    host.start()
    qemu_io(uri, "read -P 0x3c 0 512k", "read -P 0x00 512k 128k", "read -P 0x3c 640k 384k",
            "read -P 0x00 1M 64k", "read -P 0x3c 1M+64k 960k", "read -P 0xc3 10M+123 70000",
            "read -P 0x00 2M 8M+123")
    verify_ok(host, disk)


def test_flushed_write_survives_kill9(host: Host, disk: str) -> None:
    uri = host.uri(disk)
    qemu_io(uri, "write -P 0x5a 0 4M", "write -z 1M 64k", "flush")
    host.kill9()
    host.start()
    qemu_io(uri, "read -P 0x5a 0 1M", "read -P 0x00 1M 64k", "read -P 0x5a 1M+64k 3M-64k", "read -P 0x00 4M 60M")
    verify_ok(host, disk)


def test_fua_write_survives_kill9(host: Host, disk: str) -> None:
    uri = host.uri(disk)
    # qemu-io's -f is Force Unit Access: each write is durable when acknowledged, with no flush.
    qemu_io(uri, "write -f -P 0xa5 0 4M", "write -f -P 0x96 6M+4097 100k", "write -f -z 1M 128k")
    host.kill9()
    host.start()
    qemu_io(uri, "read -P 0xa5 0 1M", "read -P 0x00 1M 128k", "read -P 0xa5 1M+128k 3M-128k",
            "read -P 0x96 6M+4097 100k")
    verify_ok(host, disk)
