"""The implementation behind jaxfi's public modules: one module per concept. Not a public API."""
