"""The capability kit: what every capability builds on, learned once.

A capability (``tmk/``, and the ones after it) holds only its own protocol, device, tables,
use cases, routes and verbs; everything two capabilities would both need is here. See
``docs/adding-a-capability.md``.
"""
