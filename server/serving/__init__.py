"""Between HTTP and adapters: request -> GenerateParams, Deltas -> responses and SSE chunks."""
