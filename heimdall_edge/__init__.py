"""Heimdall Edge: a headless voice-and-camera appliance for the Raspberry Pi."""

__version__ = "0.1.0"
