"""Layer 3, http: the HTTP/1.1 server and client on raw protocols (uvloop + llhttp),
the sidecar's own request and response types, and its error vocabulary. Imports
config and telemetry only."""
