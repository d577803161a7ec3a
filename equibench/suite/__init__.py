"""The engine: specs, registry, group actions, metrics, runner, store, report, CLI."""
