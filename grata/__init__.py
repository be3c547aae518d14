"""grata-edge: test-time adaptation of fundus disc/cup segmentation on the device."""
__version__ = "0.1.0"
