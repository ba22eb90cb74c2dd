"""Payment-key formats: TR-31 key blocks, key check values and ISO 9564 PIN blocks.

Below the key store: the store makes TR-31 blocks and KCVs where the key lives, and the
POS terminal emulator reads them with the same code.
"""
