"""``kvmarina.Cache``: tensors kept as named values in the node's pool.

A library that runs inside user processes (beside an engine, or any Python on
the node): ``tensor_cache`` (the API and its in-process store), ``store`` (the
agent-backed store, through ``kvmarina.agent.client``), ``format`` (a value's
head block) and ``view`` (zero-copy reads). It holds no node state.
"""
