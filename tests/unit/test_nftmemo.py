"""The nftables views kept between hook runs: believed only while nobody else committed."""

from __future__ import annotations

from nm_policy_routing.adapters.nftmemo import NftMemo
from nm_policy_routing.model import Fwmark, Mark

FOREIGN = ([(Fwmark(-1, 0x100), "nft table inet other (chain c)")], ["nft table inet w"], [(4, "inet raw")])
MARK = Mark("incoming", "eth1", 1, 0xFFFFFFFF)


class FakeNft:
    """The ruleset of a namespace: listings and commits counted; ``crash`` fails the full listing."""

    def __init__(self, world: dict) -> None:
        self.world, self.commits, self.listings, self.listed, self.crash = world, 0, [], False, False

    def foreign(self):
        self.listings.append("ruleset")
        self.listed = not self.crash
        return ([], [], []) if self.crash else FOREIGN

    def our_marks(self):
        self.listings.append("ours")
        return set(self.world["ours"]), True, bool(self.world["ours"])

    def commit(self, marks) -> None:
        self.commits += 1
        self.world["generation"] += 1
        self.world["ours"] = set(marks)


def run(tmp_path, world, write=None, theirs: int = 0, crash: bool = False):
    """One hook run (read our table, the foreign usage, maybe write): what it saw and listed."""
    nft = FakeNft(world)
    nft.crash = crash
    memo = NftMemo(str(tmp_path), nft, lambda: world["generation"])
    ours, foreign = memo.our_marks(), memo.foreign()
    if write is not None:
        nft.commit(write)
        memo.wrote(set(write))
        assert memo.our_marks()[0] == set(write)  # the verify reads what was written
    world["generation"] += theirs
    memo.save()
    return ours[0], foreign, nft.listings


def test_believed_while_only_we_commit_and_listed_again_after_anyone_else(tmp_path) -> None:
    world = {"generation": 7, "ours": set()}
    assert run(tmp_path, world, write={MARK}) == (set(), FOREIGN, ["ours", "ruleset"])
    assert run(tmp_path, world) == ({MARK}, FOREIGN, [])  # our own commit did not spoil it
    assert run(tmp_path, world, write=set()) == ({MARK}, FOREIGN, [])
    assert run(tmp_path, world) == (set(), FOREIGN, [])
    world["generation"] += 1  # someone else's transaction between two runs
    world["ours"] = {MARK}  # (say, a restored ruleset)
    assert run(tmp_path, world) == ({MARK}, FOREIGN, ["ours", "ruleset"])
    assert run(tmp_path, world, theirs=1) == ({MARK}, FOREIGN, [])  # theirs during the run: not kept
    assert run(tmp_path, world) == ({MARK}, FOREIGN, ["ours", "ruleset"])


def test_a_crashed_listing_is_not_kept(tmp_path) -> None:
    world = {"generation": 1, "ours": set()}
    assert run(tmp_path, world, crash=True)[1:] == (([], [], []), ["ours", "ruleset"])
    assert run(tmp_path, world)[1:] == (FOREIGN, ["ruleset"])
    assert run(tmp_path, world)[1:] == (FOREIGN, [])


def test_an_unreadable_file_is_listed_again(tmp_path) -> None:
    world = {"generation": 3, "ours": set()}
    run(tmp_path, world)
    (tmp_path / "nft-memo.json").write_text("{not json")
    assert run(tmp_path, world)[2] == ["ours", "ruleset"]
