"""Shared pieces of PAG: config, presets, model factory, prompt data, trajectory codec."""
