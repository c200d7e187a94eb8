"""MedSapiensLandmarks core: anatomical landmark detection, headless and inside 3D Slicer."""
__version__ = "0.3.0"
