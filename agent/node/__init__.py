"""The node's KV memory and what it holds: the daemon's state, behind every endpoint.

``pool`` (pages lent to sessions, the block index, budgets, tiers, eviction) is the
one owner of that state; ``index``, ``slots``, ``usage`` and ``claims`` are its
data structures, ``blockops`` the operations on a serving's own named blocks,
``checksums`` the blocks' integrity, ``credentials`` who may register. Nothing
here knows about sockets, HTTP or peers (an import contract keeps it so).
"""
