"""POS terminal master key support: TR-31 key blocks and key check values (sans I/O)."""
