"""Offline programs over the runtime: the HTTP server with its kiosk page, and the camera loop."""
