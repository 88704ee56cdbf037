"""twistd dropin: ``twistd -n sfive-ngxlua ...``; the real code is in sfive_ngxlua.tap."""

from twisted.application.service import ServiceMaker

sfiveNgxlua = ServiceMaker(
    "sfive-ngxlua",
    "sfive_ngxlua.tap",
    "Import nginx-lua exporter logs into the sfive hub.",
    "sfive-ngxlua",
)
