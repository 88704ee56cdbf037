"""sfive-ngxlua: the sfive importer for nginx with the Lua exporter."""

__version__ = "1.0.0"
