"""The Lab's algorithms: pure functions of (model, spec, progress, cancel) -> result."""
