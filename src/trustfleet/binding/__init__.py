"""1. Secure-element binding without key issuance (spec §1): the SE applet, the host side,
their transports, and the sans-I/O protocol both drive."""
