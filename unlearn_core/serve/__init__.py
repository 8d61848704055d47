"""Serving providers: job files, the request queue, its worker and the Ray cluster."""
