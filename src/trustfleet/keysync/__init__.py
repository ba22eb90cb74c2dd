"""2. Automatic key synchronisation for M2M terminals (spec §2): docs/keysync.md."""
