"""Checking a result: metrics and copy detectors, the preserve check, preview images."""
