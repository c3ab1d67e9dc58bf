"""
From an accepted message to the webhook: payload, signing, circuit
breaker, delivery rounds and the treq poster.
"""
