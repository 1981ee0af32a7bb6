"""The pure parts of reading a VM's memory from warm hosts (vm/warm_pull.py): which page from which host,
and taking a host's pages only when they have the digest it named."""

from __future__ import annotations

import os
from pathlib import Path

import zstandard

from p2pvbd.vm.ram_image import RamImage, page_digest
from p2pvbd.vm.warm import WARM_PASS_SECONDS, next_round, write_pages
from p2pvbd.vm.warm_pull import image_takes_pages, plan_pull, read_index, take_pages

PAGE = 4096
EMPTY = bytes(32)


def index(*digests: bytes) -> bytes:
    return b"".join(digests)


def test_each_page_comes_once_from_a_host_that_offers_it_and_the_load_is_shared() -> None:
    a, b, c, d = (page_digest(bytes([n]) * PAGE) for n in range(1, 5))
    zero = page_digest(bytes(PAGE))
    own = index(EMPTY, b, EMPTY, EMPTY, EMPTY)  # the destination holds b already (at another slot, too)
    offers = {"home-pc": index(a, EMPTY, b, c, zero), "car-pc": index(a, d, b, c, zero)}
    plan = plan_pull(own, offers)
    assert sorted(s for slots in plan.values() for s in slots) == [0, 1, 3]  # not b, not the zero page
    assert 1 in plan["car-pc"]  # only car-pc offers slot 1
    assert plan.get("home-pc")  # the pages both offer are shared out
    # where hosts disagree, a page comes from one holding the first host's version
    assert plan_pull(b"", {"home-pc": index(a), "car-pc": index(d)}) == {"home-pc": [0]}
    # pages the destination's disk replicas hold (the page cache) are left to the move's disk references
    assert plan_pull(b"", {"home-pc": index(a, c)}, frozenset({c[:4]})) == {"home-pc": [0]}


def test_only_pages_with_the_named_digest_are_taken(tmp_path: Path) -> None:
    size = 8 * PAGE
    pages = [os.urandom(PAGE) for _ in range(3)]
    named = bytearray(size // PAGE * 32)
    for slot, page in zip((1, 4, 6), pages, strict=True):
        named[slot * 32:(slot + 1) * 32] = page_digest(page)
    sent = [pages[0], b"\xa5" * PAGE, pages[2]]  # the second is not what the host's index named
    taken = take_pages(tmp_path, size, [1, 4, 6], bytes(named),
                       zstandard.ZstdCompressor().compress(b"".join(sent)))
    assert taken == [page_digest(pages[0]), page_digest(pages[2])]
    image = RamImage.open(tmp_path)
    assert image is not None and image.get(page_digest(pages[0])) == pages[0]
    assert image.get(page_digest(pages[1])) is None and image.get(page_digest(b"\xa5" * PAGE)) is None
    assert read_index(tmp_path, 4, 1) == EMPTY
    image.close()
    # a reply that does not unpack to as many pages as asked for takes none
    assert take_pages(tmp_path, size, [2], bytes(named), b"not zstd") == []
    assert take_pages(tmp_path, size, [2, 3], bytes(named), zstandard.ZstdCompressor().compress(pages[1])) == []


def test_a_kept_image_of_another_layout_is_not_overwritten(tmp_path: Path) -> None:
    assert image_takes_pages(tmp_path, 8 * PAGE)  # none yet
    write_pages(tmp_path, 8 * PAGE, [0], os.urandom(PAGE))
    assert image_takes_pages(tmp_path, 8 * PAGE)  # a warm copy of this size
    assert not image_takes_pages(tmp_path, 16 * PAGE)
    (tmp_path / "ram.json").write_text('{"blocks": {"pc.ram": 32776, "vga.vram": 4096}}')
    assert not image_takes_pages(tmp_path, 32768)  # the image a VM left here, laid out as QEMU's stream


def test_warm_passes_keep_hashing_to_a_tenth_of_the_time_whatever_the_memory() -> None:
    assert next_round(100.0, 1.0) == 100.0 + WARM_PASS_SECONDS  # a 1 GiB guest: every 10 s
    assert next_round(100.0, 8.0) == 180.0  # 8 GiB: hashing 8 s of every 80
