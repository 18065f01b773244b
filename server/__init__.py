"""OmniLoader's HTTP server: OpenAI-compatible API, model management and the Lab."""
