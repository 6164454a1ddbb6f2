"""The KV pool's blocks on the host: which are free, who holds them, which hold a prefix.

The device pool (model/nn/attention.py) has `blocks` blocks of `block_size`
positions. Sequences hold blocks by reference count. A full block whose tokens
are known is registered under the hash of its whole prefix (its own tokens
chained to the hashes of the blocks before it), so a later sequence starting
with the same tokens reuses it instead of computing it again: automatic prefix
caching, as in vLLM. A registered block that no sequence holds stays cached
until its space is needed: allocation takes never-used blocks first, then
evicts the least recently released cached block.

A block not yet full is noted too, with the tokens whose keys it holds so far,
under its parent's hash: a prompt that continues the same prefix with the same
first tokens (the same question again, the next turn of a chat) copies that
block and computes only the rest, so reuse is by the token, not by the block
(as llama.cpp's slots and SGLang's radix cache reuse). A noted block stays free
to take, last of the free ones; taking it forgets the note.

No JAX here: the scheduler thread owns one BlockPool and decides everything
about placement; the device only follows the block tables it is given.
"""

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

Hash = bytes


def chain_hash(parent: Hash | None, tokens: Sequence[int]) -> Hash:
    """The hash of a block holding `tokens` after the prefix hashed `parent`."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(np.asarray(tokens, np.int64).tobytes())
    return digest.digest()


def prefix_hashes(tokens: Sequence[int], block_size: int, count: int) -> list[Hash]:
    """The chained hashes of the first `count` full blocks of `tokens`."""
    hashes: list[Hash] = []
    parent = None
    for i in range(count):
        parent = chain_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class BlockPool:
    """Free blocks, reference counts and the prefix cache of one KV pool."""

    def __init__(self, blocks: int, block_size: int) -> None:
        self.blocks = blocks
        self.block_size = block_size
        self._never_cached = list(range(blocks - 1, -1, -1))  # a stack: lowest ids first
        self._refs = [0] * blocks
        self._hash_of: dict[int, Hash] = {}  # registered blocks
        self._block_of: dict[Hash, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: LRU first
        self._partial: dict[Hash | None, dict[int, tuple[int, ...]]] = {}  # parent → notes
        self._parent_of: dict[int, Hash | None] = {}  # noted blocks
        self.hits = 0  # blocks served from the cache, ever
        self.partial_hits = 0  # positions copied from noted blocks, ever

    @property
    def available(self) -> int:
        """Blocks an allocation can take now (free or evictable)."""
        return len(self._never_cached) + len(self._idle)

    @property
    def cached(self) -> int:
        """Blocks holding a registered prefix."""
        return len(self._hash_of)

    def allocate(self) -> int | None:
        """A block with reference count 1, or None when every block is held."""
        if self._never_cached:
            block = self._never_cached.pop()
        elif self._idle:
            block, _ = self._idle.popitem(last=False)  # the least recently used
            del self._block_of[self._hash_of.pop(block)]
        else:
            return None
        self._refs[block] = 1
        self._forget(block)
        return block

    def note(self, block: int, parent: Hash | None, tokens: tuple[int, ...]) -> None:
        """Block `block` (held, not full) holds the keys of `tokens` after the prefix
        hashed `parent`."""
        if self._parent_of.get(block, parent) != parent:
            self._forget(block)
        self._parent_of[block] = parent
        self._partial.setdefault(parent, {})[block] = tokens

    def match(self, parent: Hash | None, tokens: Sequence[int]) -> tuple[int, int]:
        """The noted block after `parent` whose tokens share the longest start with
        `tokens`, and that length (0: none)."""
        best = (-1, 0)
        for block, held in self._partial.get(parent, {}).items():
            n = 0
            while n < min(len(held), len(tokens)) and held[n] == tokens[n]:
                n += 1
            best = max(best, (block, n), key=lambda found: found[1])
        return best

    def _forget(self, block: int) -> None:
        """Drop a block's note (it is taken again, or holds another prefix now)."""
        if block in self._parent_of:
            parent = self._parent_of.pop(block)
            del self._partial[parent][block]
            if not self._partial[parent]:
                del self._partial[parent]

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones become free or idle-cached."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._idle[block] = None
                elif block in self._parent_of:
                    self._never_cached.insert(0, block)  # noted: taken last
                else:
                    self._never_cached.append(block)

    def register(self, block: int, prefix: Hash) -> None:
        """Block `block` (held) now holds the full block whose prefix hash is `prefix`."""
        if block in self._hash_of or prefix in self._block_of:
            return  # already cached (the same content under another block: keep the first)
        self._hash_of[block] = prefix
        self._block_of[prefix] = block

    def lookup(self, hashes: Sequence[Hash]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the start, each now
        referenced once more by the caller."""
        found = []
        for prefix in hashes:
            block = self._block_of.get(prefix)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            found.append(block)
        self.hits += len(found)
        return found
