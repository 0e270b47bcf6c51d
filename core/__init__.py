"""What every app shares and none owns: the client's address and rate limits.

Plain Django (and DRF for the throttle classes); imports nothing of ours, so every app may import it.
"""
