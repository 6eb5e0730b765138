"""KV connectors: the node agent's pool as the prefix store of engines other than ours.

``kvmarina.connector.vllm`` is a vLLM KV connector (``KVConnectorBase_V1``): vLLM pods
on a node read each other's prefixes from the node agent's shared pages, save the full
blocks they compute there (committed, evented, checksummed by the agent), and pull
blocks from a peer node's agent when the router says so. The modules of this package
other than ``vllm`` import nothing of vLLM, so they are tested without it.
"""
