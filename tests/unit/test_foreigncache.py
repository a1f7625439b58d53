"""The foreign nftables usage kept between hook runs: used again only while nobody else committed."""

from __future__ import annotations

from nm_policy_routing.adapters.foreigncache import ForeignCache
from nm_policy_routing.model import Fwmark

ANSWER = ([(Fwmark(-1, 0x100), "nft table inet other (chain c)")], ["nft table inet w"], [(4, "inet raw")])


class FakeNft:
    """Lists the ruleset (counted), commits (counted); ``crash`` makes a listing fail."""

    def __init__(self, world: dict) -> None:
        self.world, self.commits, self.listings, self.listed, self.crash = world, 0, 0, False, False

    def foreign(self):
        self.listings += 1
        self.listed = not self.crash
        return ([], [], []) if self.crash else ANSWER

    def commit(self) -> None:
        self.commits += 1
        self.world["generation"] += 1


def run(tmp_path, world, ours: int = 0, theirs: int = 0, crash: bool = False):
    """One hook run: the answer, and whether it listed the ruleset."""
    nft = FakeNft(world)
    nft.crash = crash
    cache = ForeignCache(str(tmp_path), nft, lambda: world["generation"])
    answer = cache.foreign()
    for _ in range(ours):
        nft.commit()
    world["generation"] += theirs
    cache.save()
    return answer, nft.listings == 1


def test_kept_while_only_we_commit_and_listed_again_after_anyone_else(tmp_path) -> None:
    world = {"generation": 7}
    assert run(tmp_path, world, ours=1) == (ANSWER, True)
    assert run(tmp_path, world) == (ANSWER, False)  # our own commit did not invalidate it
    assert run(tmp_path, world, ours=2) == (ANSWER, False)
    world["generation"] += 1  # someone else's transaction between two runs
    assert run(tmp_path, world) == (ANSWER, True)
    assert run(tmp_path, world, ours=1, theirs=1) == (ANSWER, False)  # theirs during the run: not kept
    assert run(tmp_path, world) == (ANSWER, True)


def test_a_crashed_listing_is_not_kept(tmp_path) -> None:
    world = {"generation": 1}
    assert run(tmp_path, world, crash=True) == (([], [], []), True)
    assert run(tmp_path, world) == (ANSWER, True)
    assert run(tmp_path, world) == (ANSWER, False)


def test_an_unreadable_file_is_listed_again(tmp_path) -> None:
    world = {"generation": 3}
    run(tmp_path, world)
    (tmp_path / "foreign-nft.json").write_text("{not json")
    assert run(tmp_path, world) == (ANSWER, True)
