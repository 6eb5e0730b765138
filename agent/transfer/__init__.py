"""Agent-to-agent block moves: ``service`` (pulls from peers, and the service both
sides run), ``serve`` (answering a peer's fetches), ``wire`` (the bytes on the
stream) and ``auth`` (the pool's transfer token and mutual TLS).
"""
