"""The adapter protocol, configs, registries, targeting and AdapterState: what every other part imports."""
