"""Helpers for the A1111 WebUI tests (fake ``modules`` package, tiny checkpoint writer, server runner)."""
