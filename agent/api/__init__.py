"""The agent's endpoints on the node: ``protocol`` (engines' unix socket: register,
lease, commit, lookup, release, pushed reclaims) and ``http`` (health, ``/stats``,
``/metrics``, block events). Both are thin layers over ``kvmarina.agent.node``.
"""
