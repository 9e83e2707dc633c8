"""gmi inside the Automatic1111 WebUI (and Forge): the host adapter and the glue behind scripts/gmi_*.py.

The files in ``scripts/`` are what the WebUI loads; each only registers one concern (settings, API routes,
the Identify tab, the auto-select script) and delegates here. This package sits at the extension root, which the
WebUI puts on ``sys.path`` while it loads ``scripts/`` (as adetailer's glue does), so they import it without
``sys.path`` edits. Everything that is not WebUI-specific lives in ``gmi_core`` (the service layer:
:mod:`gmi_core.service`).
"""
