"""DICOMweb (PS3.18) as pure pieces the gateway's HTTP port puts together: QIDO-RS query
parsing and results, WADO-RS rendering (metadata, frames, bulk data, media types),
STOW-RS parts and responses, and a STOW-RS client. No web framework here: handlers live in
`telerad.runtime.gateway.dicomweb`."""
