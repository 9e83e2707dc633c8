"""gmi inside the Automatic1111 WebUI (and Forge): the host adapter and the glue behind scripts/gmi_*.py.

The files in ``scripts/`` are what the WebUI loads; each only registers one concern (settings, API routes,
the Identify tab, the auto-select script) and delegates here. Everything that is not WebUI-specific lives in
``gmi_core``.
"""
