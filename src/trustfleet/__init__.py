"""trustfleet: lifecycle trust for fleets of IoT devices and payment terminals."""

__version__ = "0.1.0"
